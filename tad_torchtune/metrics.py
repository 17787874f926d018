"""Held-out evaluation metrics, accumulated batch by batch.

``StudentMetrics`` compares a student with the teacher: held-out ``KL(teacher || student)``,
cross-entropy and perplexity against the labels, Full-ECE, top-1 accuracy and top-1 agreement with
the teacher. ``TeacherMetrics`` describes the teacher alone, as in Figure 2 of the TAD paper
(arXiv 2602.20816): the mean tail mass ``alpha_K`` for several K and the rate at which the
teacher's most probable token is not the actual next token; plus its own CE, perplexity and
Full-ECE.

Conventions shared by both:

- Inputs are ``[B, T, V]`` logits (any float dtype) and ``[B, T]`` labels already shifted
  (position t predicts ``labels[t]``); a label equal to ``ignore_index`` removes that position
  from every sum and count, and whatever its logits hold (NaN, inf) never reaches a result.
- Work is done ``chunk_size`` tokens at a time in float32 (float64 inputs stay float64), so no
  ``[B, T, V]`` float32 copy is made; sums are kept in float64 across batches.
- Every reported value is a mean over all valid tokens seen (not a mean of batch means).
- Top-1 ties are broken as ``torch.argmax`` does (the lowest index).

Full-ECE (Liu et al., 2024, "Full-ECE: A Metric For Token-level Calibration on Large Language
Models", arXiv 2406.11345), the calibration metric of the TAD paper's Table 4. Unlike the usual
ECE, which bins only the top-1 confidence, it bins EVERY predicted probability ``q_t(k)`` of every
valid token t and every vocabulary entry k. With M equal-width bins ``B_m`` over [0, 1] (bin m
holds ``m/M <= q < (m+1)/M``, the last bin also holds 1.0; M = 10 by default) and N valid tokens::

    A_m = sum_{(t,k) in B_m} 1[k == y_t] / |B_m|       (accuracy: the entry IS the label)
    C_m = sum_{(t,k) in B_m} q_t(k)      / |B_m|       (mean confidence)
    Full-ECE = sum_m |B_m| / N * |A_m - C_m|
             = (1/N) * sum_m | #labels whose probability falls in B_m - sum of probabilities in B_m |

``|B_m| / N`` is the paper's weight, with N the number of tokens (not N * V); the weights sum to
V, and Full-ECE lies in [0, 2]. Dividing by N * V instead would give a value V times smaller; the
per-bin counts, accuracies and confidences are returned as well (``reliability``) for anyone who
needs another normalisation or a reliability diagram.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from tad_torchtune.losses._reduction import align_teacher_vocab, check_vocab_alignment
from tad_torchtune.losses.kl import forward_kl_chunk

#: tail-mass K values of the paper's Figure 2
TAIL_KS: tuple[int, ...] = (1, 2, 5, 10, 20, 50)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _valid_chunks(labels: Tensor, chunk_size: int | None, ignore_index: int, *logits: Tensor):
    """Yield ``(labels [n], *logits [n, V] upcast)`` for the valid tokens, chunk by chunk."""
    y = labels.reshape(-1)  # (N,)
    flat = [x.reshape(y.shape[0], x.shape[-1]) for x in logits]  # (N, V) views when contiguous
    n = y.shape[0]
    step = n if not chunk_size or chunk_size >= n else chunk_size
    for start in range(0, n, max(step, 1)):
        yc = y[start : start + step]
        keep = yc != ignore_index
        if not bool(keep.any()):
            continue
        yield (yc[keep], *(x[start : start + step][keep].to(_compute_dtype(x.dtype)) for x in flat))


def _check_inputs(logits: Tensor, labels: Tensor, name: str) -> None:
    if logits.dim() < 2 or not logits.is_floating_point():
        raise ValueError(f"{name} must be floating point [B, T, V] or [N, V], got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal the leading shape "
            f"{tuple(logits.shape[:-1])} of {name}"
        )


class _CalibrationAndCE:
    """CE, top-1 accuracy and the Full-ECE bins of one model's predictions against the labels."""

    def __init__(self, num_bins: int) -> None:
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
            raise ValueError(f"num_bins must be an integer >= 1, got {num_bins!r}")
        self.num_bins = num_bins
        self.num_tokens = 0
        self.ce_sum = 0.0
        self.correct = 0
        self.bin_count = torch.zeros(num_bins, dtype=torch.float64)
        self.bin_prob = torch.zeros(num_bins, dtype=torch.float64)
        self.bin_label = torch.zeros(num_bins, dtype=torch.float64)

    def update(self, log_q: Tensor, y: Tensor) -> Tensor:
        """Add a chunk; ``log_q`` is ``[n, V]`` log-probabilities. Returns the argmax ``[n]``."""
        n = y.shape[0]
        self.num_tokens += n
        self.ce_sum += float(-log_q.gather(1, y[:, None]).sum(dtype=torch.float64))
        top1 = log_q.argmax(-1)
        self.correct += int((top1 == y).sum())
        q = log_q.exp()  # (n, V)
        bins = (q * self.num_bins).long().clamp_(0, self.num_bins - 1)  # (n, V)
        # per-row partial sums in the compute dtype (V terms each), rows summed in float64
        per_row = q.new_zeros(n, self.num_bins).scatter_add_(1, bins, q)  # (n, M)
        self.bin_prob += per_row.sum(0, dtype=torch.float64)
        self.bin_count += torch.bincount(bins.flatten(), minlength=self.num_bins).double()
        label_bins = bins.gather(1, y[:, None]).squeeze(1)
        self.bin_label += torch.bincount(label_bins, minlength=self.num_bins).double()
        return top1

    def compute(self) -> dict[str, Any]:
        n = max(self.num_tokens, 1)
        ce = self.ce_sum / n if self.num_tokens else float("nan")
        count = self.bin_count.clamp(min=1)
        return {
            "ce": ce,
            "ppl": float("inf") if ce > 709.0 else math.exp(ce),  # nan stays nan
            "top1_accuracy": self.correct / n if self.num_tokens else float("nan"),
            "full_ece": float((self.bin_label - self.bin_prob).abs().sum() / n)
            if self.num_tokens else float("nan"),
            "reliability": {
                "bin_edges": [m / self.num_bins for m in range(self.num_bins + 1)],
                "count": self.bin_count.tolist(),
                "accuracy": (self.bin_label / count).tolist(),
                "confidence": (self.bin_prob / count).tolist(),
            },
        }


class StudentMetrics:
    """Streaming held-out metrics of a student against its teacher and the labels.

    ``compute()`` returns (means over all valid tokens seen):

    - ``kl``: ``KL(p || q) = sum_i p_i (log p_i - log q_i)``, p the teacher's, q the student's
      next-token distribution (the forward KL of vanilla KD, 0 when they are equal);
    - ``ce``: ``-log q(y)``; ``ppl = exp(ce)``;
    - ``full_ece``: Full-ECE of q (module docstring), with ``reliability`` its bins;
    - ``top1_accuracy``: ``argmax q == y``; ``top1_agreement``: ``argmax q == argmax p``;
    - ``num_tokens``.

    Args:
        num_bins: Full-ECE bins over [0, 1].
        ignore_index: label of positions that do not count.
        chunk_size: tokens upcast at once; ``None`` for all.
        temperature: both logits are divided by it before the softmax (1.0 for evaluation).
        vocab_alignment: ``"exact"`` or ``"truncate_teacher"`` (see ``tad_torchtune.losses``).
    """

    def __init__(
        self,
        *,
        num_bins: int = 10,
        ignore_index: int = -100,
        chunk_size: int | None = 1024,
        temperature: float = 1.0,
        vocab_alignment: str = "exact",
    ) -> None:
        self._own = _CalibrationAndCE(num_bins)
        self.ignore_index = int(ignore_index)
        self.chunk_size = chunk_size
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.vocab_alignment = check_vocab_alignment(vocab_alignment)
        self.kl_sum = 0.0
        self.agree = 0

    @torch.no_grad()
    def update(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> None:
        """Add a batch.

        Args:
            student_logits: ``[B, T, V]``.
            teacher_logits: ``[B, T, V_T]``.
            labels: ``[B, T]`` (``ignore_index`` where the position does not count).
        """
        _check_inputs(student_logits, labels, "student_logits")
        _check_inputs(teacher_logits, labels, "teacher_logits")
        teacher_logits = align_teacher_vocab(
            teacher_logits, student_logits.shape[-1], self.vocab_alignment
        )
        for y, s, t in _valid_chunks(
            labels, self.chunk_size, self.ignore_index, student_logits, teacher_logits
        ):
            s, t = s / self.temperature, t / self.temperature
            kl, _ = forward_kl_chunk(s, t, y)
            self.kl_sum += float(kl.sum(dtype=torch.float64))
            top1 = self._own.update(torch.log_softmax(s, dim=-1), y)
            self.agree += int((top1 == t.argmax(-1)).sum())

    def compute(self) -> dict[str, Any]:
        out = self._own.compute()
        n = self._own.num_tokens
        out["kl"] = self.kl_sum / n if n else float("nan")
        out["top1_agreement"] = self.agree / n if n else float("nan")
        out["num_tokens"] = n
        return out


class TeacherMetrics:
    """Streaming statistics of the teacher alone (the TAD paper's Figure 2).

    ``compute()`` returns (means over all valid tokens seen):

    - ``tail_mass``: ``{K: mean_t alpha_K(t)}`` with ``alpha_K(t) = 1 - sum of the K largest
      p_t(i)``, computed in log space as ``exp(LSE(log p_t outside its top K))`` (sorted, then a
      reversed log-cum-sum-exp), never as ``1 - sum``;
    - ``mismatch_rate``: fraction of tokens with ``argmax p_t != y_t`` (= 1 - ``top1_accuracy``);
    - ``ce``, ``ppl``, ``full_ece``, ``reliability``, ``top1_accuracy``, ``num_tokens`` as in
      ``StudentMetrics``.

    Args:
        ks: the K values; each must be >= 1 and smaller than the vocabulary.
        num_bins, ignore_index, chunk_size, temperature: as ``StudentMetrics``.
    """

    def __init__(
        self,
        *,
        ks: tuple[int, ...] | list[int] = TAIL_KS,
        num_bins: int = 10,
        ignore_index: int = -100,
        chunk_size: int | None = 1024,
        temperature: float = 1.0,
    ) -> None:
        ks = tuple(ks)
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
            raise ValueError(f"ks must be a non-empty list of integers >= 1, got {ks!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.ks = tuple(sorted(set(ks)))
        self._own = _CalibrationAndCE(num_bins)
        self.ignore_index = int(ignore_index)
        self.chunk_size = chunk_size
        self.temperature = float(temperature)
        self.tail_sum = torch.zeros(len(self.ks), dtype=torch.float64)

    @torch.no_grad()
    def update(self, teacher_logits: Tensor, labels: Tensor) -> None:
        """Add a batch: ``teacher_logits [B, T, V]``, ``labels [B, T]``."""
        _check_inputs(teacher_logits, labels, "teacher_logits")
        vocab = teacher_logits.shape[-1]
        if self.ks[-1] >= vocab:
            raise ValueError(f"every K in ks must be < the vocabulary size {vocab}, got ks={self.ks}")
        index = torch.tensor(self.ks)
        for y, t in _valid_chunks(labels, self.chunk_size, self.ignore_index, teacher_logits):
            log_p = torch.log_softmax(t / self.temperature, dim=-1)  # (n, V)
            self._own.update(log_p, y)
            desc = log_p.sort(dim=-1, descending=True).values  # (n, V)
            # log_tail[:, j] = LSE(desc[:, j:]): the log-mass outside the j largest entries
            log_tail = desc.flip(-1).logcumsumexp(-1).flip(-1)  # (n, V)
            alpha = log_tail[:, index].exp()  # (n, len(ks))
            self.tail_sum += alpha.sum(0, dtype=torch.float64)

    def compute(self) -> dict[str, Any]:
        out = self._own.compute()
        n = self._own.num_tokens
        out["tail_mass"] = {
            k: (float(s) / n if n else float("nan")) for k, s in zip(self.ks, self.tail_sum)
        }
        out["mismatch_rate"] = 1.0 - out["top1_accuracy"] if n else float("nan")
        out["num_tokens"] = n
        return out
