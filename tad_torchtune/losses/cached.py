"""Divergences from a teacher cache: the teacher's top-M probabilities plus one bucket.

A cache holds, per position (``docs/design.md``, "Divergences from a teacher cache"):

- ``ids [.., M]``: the teacher's M most probable ids, most probable first;
- ``logp [.., M]``: their log-probabilities under the FULL softmax;
- ``log_rest [..]``: ``log r_M``, the log of the mass outside those ids, computed as
  ``LSE(logits outside the top-M) - LSE(logits)``, never as ``log(1 - sum)``;
- ``label_logp [..]``: the teacher's log-probability of the label (the next token).

All at the cache's temperature. Merging outcomes into one bucket can only lower a KL (the data
processing inequality), so a cached divergence is a lower bound of its online value, equal when
the bucket holds a single id (M = V - 1). The student side needs its full log-sum-exp, its
logits at the cached ids and the log-sum-exp of its logits outside them: ``student_side``.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from tad_torchtune.common import compute_dtype


@dataclass
class TeacherTopM:
    """Cached teacher statistics of a batch, ``[..., M]`` and ``[...]`` (see the module
    docstring); a divergence's ``sum_and_count_cached`` and the fused head take it in place of
    teacher logits."""

    ids: Tensor
    logp: Tensor
    log_rest: Tensor
    label_logp: Tensor

    @property
    def top_m(self) -> int:
        return self.ids.shape[-1]

    def flat(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The four tensors as ``[N, M]``, ``[N, M]``, ``[N]``, ``[N]`` (long, then the compute
        dtype: float32, float64 stays float64)."""
        m, dtype = self.top_m, compute_dtype(self.logp.dtype)
        return (self.ids.reshape(-1, m).long(), self.logp.reshape(-1, m).to(dtype),
                self.log_rest.reshape(-1).to(dtype), self.label_logp.reshape(-1).to(dtype))

    def to(self, device: torch.device | str) -> "TeacherTopM":
        return TeacherTopM(*(x.to(device, non_blocking=True) for x in
                             (self.ids, self.logp, self.log_rest, self.label_logp)))


@torch.no_grad()
def teacher_top_m(logits: Tensor, labels: Tensor, top_m: int, *, temperature: float = 1.0,
                  chunk_size: int = 1024) -> TeacherTopM:
    """The cache entries of teacher logits ``[..., V]`` (already aligned to the student's
    vocabulary) and their labels ``[...]`` (an ignored label gets ``label_logp`` 0), in float32
    (float64 stays float64), chunk by chunk.

    Raises:
        ValueError: unless ``1 <= top_m < V``.
    """
    vocab = logits.shape[-1]
    if not 1 <= top_m < vocab:
        raise ValueError(f"top_m must be in [1, {vocab}) for a vocabulary of {vocab}, got {top_m}")
    flat = logits.reshape(-1, vocab)
    y = labels.reshape(-1)
    parts = []
    for start in range(0, flat.shape[0], chunk_size):
        z = flat[start : start + chunk_size].to(compute_dtype(flat.dtype)) / temperature  # (n, V)
        yc = y[start : start + chunk_size]
        lse = z.logsumexp(-1)
        top, ids = z.topk(top_m, dim=-1)  # sorted, most probable first
        rest = z.scatter(-1, ids, float("-inf")).logsumexp(-1)
        label = z.gather(-1, yc.clamp(min=0).unsqueeze(-1)).squeeze(-1) - lse
        parts.append((ids, top - lse.unsqueeze(-1), rest - lse,
                      torch.where(yc >= 0, label, label.new_zeros(()))))
    ids, logp, log_rest, label_logp = (torch.cat(p) for p in zip(*parts))
    lead = labels.shape
    return TeacherTopM(ids.reshape(*lead, top_m), logp.reshape(*lead, top_m),
                       log_rest.reshape(lead), label_logp.reshape(lead))


def sanitized(valid: Tensor, ids: Tensor, logp: Tensor, log_rest: Tensor, label_logp: Tensor
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The cache entries with those of ignored positions ``[N]`` replaced by a consistent,
    finite stand-in (distinct ids, a uniform distribution), so that nothing they hold (a block's
    last position is never computed) reaches a value or a gradient."""
    n, m = ids.shape
    vocab_guess = m + 1  # any V > M: the stand-in spreads the mass over M + 1 outcomes
    rows = valid.unsqueeze(-1)
    uniform = -torch.log(logp.new_tensor(float(vocab_guess)))
    return (torch.where(rows, ids, torch.arange(m, device=ids.device)),
            torch.where(rows, logp, uniform), torch.where(valid, log_rest, uniform),
            torch.where(valid, label_logp, uniform))


def student_side(s: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(lse [n], s_M [n, M], lse_rest [n])`` of scaled student logits ``s [n, V]``: the full
    log-sum-exp, the logits at the cached ids and the log-sum-exp outside them."""
    s_m = s.gather(-1, ids)
    lse_rest = s.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return torch.logaddexp(lse_rest, s_m.logsumexp(-1)), s_m, lse_rest


def bucketed(log_top: Tensor, log_bucket: Tensor) -> Tensor:
    """``[n, M + 1]`` log-masses of the M cached outcomes and the bucket."""
    return torch.cat([log_top, log_bucket.unsqueeze(-1)], dim=-1)


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0`` without cancellation (the log of a mass's complement
    when only the mass's log is known: a bucket without the label). ``x >= 0`` (nothing left)
    gives ``-inf`` with a zero gradient, not NaN."""
    empty = x >= 0
    x = torch.where(empty, x.new_full((), -1.0), x)  # the gradient flows through finite values only
    out = torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return out.masked_fill(empty, float("-inf"))
