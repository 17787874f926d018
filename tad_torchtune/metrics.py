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
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from tad_torchtune.checks import check_int, check_positive, is_int
from tad_torchtune.common import IGNORE_INDEX, apply_softcap, compute_dtype, full_tensor
from tad_torchtune.losses.engine import DEFAULT_CHUNK_SIZE, chunk_slices
from tad_torchtune.losses.kl import forward_kl_chunk
from tad_torchtune.vocab import MergedRows, align_teacher_vocab, check_vocab_alignment

#: tail-mass K values of the paper's Figure 2
TAIL_KS: tuple[int, ...] = (1, 2, 5, 10, 20, 50)


def _valid_chunks(labels: Tensor, chunk_size: int | None, ignore_index: int,
                  *logits: Tensor) -> Iterator[tuple[Tensor, ...]]:
    """``(labels [n], *logits [n, V] upcast)`` of the valid tokens, chunk by chunk (the engine's
    chunks: ``engine.chunk_slices``)."""
    y = labels.reshape(-1)  # (N,)
    flat = [x.reshape(y.shape[0], x.shape[-1]) for x in logits]  # (N, V) views when contiguous
    for sl in chunk_slices(y.shape[0], chunk_size):
        keep = y[sl] != ignore_index
        yield (y[sl][keep], *(x[sl][keep].to(compute_dtype(x.dtype)) for x in flat))


def _projected_chunks(labels: Tensor, chunk_size: int | None, ignore_index: int,
                      *sides: tuple[Tensor, Tensor, Tensor | None, float | None],
                      merge: MergedRows | None = None) -> Iterator[tuple[Tensor, ...]]:
    """As ``_valid_chunks``, from ``(hidden [..., D], weight [V, D], bias [V] | None, softcap)``
    per model: each chunk's logits are projected (and soft-capped) on the fly, so ``[N, V]``
    never exists; ``merge`` folds the rows of ``teacher_id_merges`` into the last side's."""
    y = labels.reshape(-1)
    flat = [(h.reshape(y.shape[0], h.shape[-1]), full_tensor(w),
             None if b is None else full_tensor(b), cap) for h, w, b, cap in sides]
    for sl in chunk_slices(y.shape[0], chunk_size):
        keep = y[sl] != ignore_index
        chunks = []
        for i, (h, w, b, cap) in enumerate(flat):
            x = h[sl][keep]
            z = torch.nn.functional.linear(x, w, b)
            if merge is not None and i == len(flat) - 1:  # rounded to z's dtype, as on logits
                z = merge.apply_(z, x)
            chunks.append(apply_softcap(z.to(compute_dtype(h.dtype)), cap))
        yield (y[sl][keep], *chunks)


def _check_inputs(logits: Tensor, labels: Tensor, name: str) -> None:
    if logits.dim() < 2 or not logits.is_floating_point():
        raise ValueError(f"{name} must be floating point [B, T, V] or [N, V], got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal the leading shape "
            f"{tuple(logits.shape[:-1])} of {name}"
        )


def _all_reduce(t: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


class _CalibrationAndCE:
    """CE, top-1 accuracy and the Full-ECE bins of one model's predictions against the labels,
    as float64 sums in one tensor (``state``), so processes can add theirs up."""

    def __init__(self, num_bins: int, calibration: bool = True) -> None:
        self.num_bins = check_int(num_bins, "num_bins")
        self.calibration = calibration
        # num_tokens, ce_sum, correct, then per bin: count, sum of probabilities, labels
        self.state = torch.zeros(3 + 3 * num_bins, dtype=torch.float64)

    def update(self, log_q: Tensor, y: Tensor) -> Tensor:
        """Add a chunk; ``log_q`` is ``[n, V]`` log-probabilities. Returns the argmax ``[n]``."""
        if self.state.device != log_q.device:
            self.state = self.state.to(log_q.device)
        n, m = y.shape[0], self.num_bins
        top1 = log_q.argmax(-1)
        head = torch.stack([
            log_q.new_tensor(float(n), dtype=torch.float64),
            -log_q.gather(1, y[:, None]).sum(dtype=torch.float64),
            (top1 == y).sum().double(),
        ])
        self.state[:3] += head
        if self.calibration and n:
            q = log_q.exp()  # (n, V)
            bins = (q * m).long().clamp_(0, m - 1)  # (n, V)
            # per-row partial sums in the compute dtype (V terms each), rows summed in float64
            per_row = q.new_zeros(n, m).scatter_add_(1, bins, q)  # (n, M)
            self.state[3 : 3 + m] += torch.bincount(bins.flatten(), minlength=m).double()
            self.state[3 + m : 3 + 2 * m] += per_row.sum(0, dtype=torch.float64)
            label_bins = bins.gather(1, y[:, None]).squeeze(1)
            self.state[3 + 2 * m :] += torch.bincount(label_bins, minlength=m).double()
        return top1

    def compute(self) -> dict[str, Any]:
        state = self.state.cpu()
        num_tokens = int(state[0])
        n = max(num_tokens, 1)
        m = self.num_bins
        ce = float(state[1]) / n if num_tokens else float("nan")
        out = {
            "ce": ce,
            "ppl": float("inf") if ce > 709.0 else math.exp(ce),  # nan stays nan
            "top1_accuracy": float(state[2]) / n if num_tokens else float("nan"),
        }
        if self.calibration:
            count, prob, label = state[3 : 3 + m], state[3 + m : 3 + 2 * m], state[3 + 2 * m :]
            out["full_ece"] = (float((label - prob).abs().sum() / n) if num_tokens
                               else float("nan"))
            out["reliability"] = {
                "bin_edges": [i / m for i in range(m + 1)],
                "count": count.tolist(),
                "accuracy": (label / count.clamp(min=1)).tolist(),
                "confidence": (prob / count.clamp(min=1)).tolist(),
            }
        return out


class StudentMetrics:
    """Streaming held-out metrics of a student against its teacher and the labels: what
    ``tad_eval`` reports and what ``tad_distill`` logs as ``val_*`` (one implementation).

    ``compute()`` returns (means over all valid tokens seen):

    - ``kl``: ``KL(p || q) = sum_i p_i (log p_i - log q_i)``, p the teacher's, q the student's
      next-token distribution (the forward KL of vanilla KD, 0 when they are equal);
    - ``ce``: ``-log q(y)``; ``ppl = exp(ce)``;
    - ``full_ece``: Full-ECE of q (module docstring), with ``reliability`` its bins (only with
      ``calibration``);
    - ``top1_accuracy``: ``argmax q == y``; ``top1_agreement``: ``argmax q == argmax p``;
    - ``num_tokens``.

    The sums live in one float64 tensor on the inputs' device; ``all_reduce()`` adds up those of
    every process (``torch.distributed``) before ``compute()``.

    Args:
        num_bins: Full-ECE bins over [0, 1].
        ignore_index: label of positions that do not count.
        chunk_size: tokens upcast at once; ``None`` for all.
        temperature: both logits are divided by it before the softmax (1.0 for evaluation).
        vocab_alignment: ``"exact"`` or ``"truncate_teacher"`` (``tad_torchtune.vocab``).
        calibration: also accumulate the Full-ECE bins (one more pass over each chunk).
    """

    def __init__(
        self,
        *,
        num_bins: int = 10,
        ignore_index: int = IGNORE_INDEX,
        chunk_size: int | None = DEFAULT_CHUNK_SIZE,
        temperature: float = 1.0,
        vocab_alignment: str = "exact",
        calibration: bool = True,
    ) -> None:
        self._own = _CalibrationAndCE(num_bins, calibration)
        self.ignore_index = int(ignore_index)
        self.chunk_size = chunk_size
        self.temperature = check_positive(temperature, "temperature")
        self.vocab_alignment = check_vocab_alignment(vocab_alignment)
        self._pair = torch.zeros(2, dtype=torch.float64)  # kl_sum, agree

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
        self._add(_valid_chunks(labels, self.chunk_size, self.ignore_index, student_logits,
                                teacher_logits))

    @torch.no_grad()
    def update_from_hidden(
        self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
        teacher_weight: Tensor, labels: Tensor, *, student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None, student_softcap: float | None = None,
        teacher_softcap: float | None = None, teacher_merge: MergedRows | None = None,
    ) -> None:
        """Add a batch given as final hidden states ``[B, T, D]``, output weights ``[V, D]`` and
        biases ``[V]`` (the fused path's inputs); the same values as ``update`` on their
        logits (``teacher_merge``: the rows of ``teacher_id_merges``, folded into each teacher
        chunk, as ``IdMerges.align_`` folds them into logits)."""
        vocab = student_weight.shape[0]
        w_t = align_teacher_vocab(full_tensor(teacher_weight).t(), vocab, self.vocab_alignment).t()
        if teacher_bias is not None:
            teacher_bias = align_teacher_vocab(full_tensor(teacher_bias), vocab,
                                               self.vocab_alignment)
        self._add(_projected_chunks(
            labels, self.chunk_size, self.ignore_index,
            (student_hidden, student_weight, student_bias, student_softcap),
            (teacher_hidden, w_t, teacher_bias, teacher_softcap), merge=teacher_merge))

    def _add(self, chunks) -> None:
        for y, s, t in chunks:
            if self._pair.device != s.device:
                self._pair = self._pair.to(s.device)
            s, t = s / self.temperature, t / self.temperature
            kl, _ = forward_kl_chunk(s, t, y)
            top1 = self._own.update(torch.log_softmax(s, dim=-1), y)
            self._pair += torch.stack([kl.sum(dtype=torch.float64),
                                       (top1 == t.argmax(-1)).sum().double()])

    def all_reduce(self) -> "StudentMetrics":
        """Sum the accumulated state over all processes (a collective: every rank calls it)."""
        _all_reduce(self._own.state)
        _all_reduce(self._pair)
        return self

    def compute(self) -> dict[str, Any]:
        out = self._own.compute()
        n = int(self._own.state[0])
        kl_sum, agree = self._pair.tolist()
        out["kl"] = kl_sum / n if n else float("nan")
        out["top1_agreement"] = agree / n if n else float("nan")
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
        ignore_index: int = IGNORE_INDEX,
        chunk_size: int | None = DEFAULT_CHUNK_SIZE,
        temperature: float = 1.0,
    ) -> None:
        ks = tuple(ks)
        if not ks or not all(is_int(k) and k >= 1 for k in ks):
            raise ValueError(f"ks must be a non-empty list of integers >= 1, got {ks!r}")
        self.temperature = check_positive(temperature, "temperature")
        self.ks = tuple(sorted(set(ks)))
        self._own = _CalibrationAndCE(num_bins)
        self.ignore_index = int(ignore_index)
        self.chunk_size = chunk_size
        self.tail_sum = torch.zeros(len(self.ks), dtype=torch.float64)

    @torch.no_grad()
    def update(self, teacher_logits: Tensor, labels: Tensor) -> None:
        """Add a batch: ``teacher_logits [B, T, V]``, ``labels [B, T]``."""
        _check_inputs(teacher_logits, labels, "teacher_logits")
        vocab = teacher_logits.shape[-1]
        if self.ks[-1] >= vocab:
            raise ValueError(f"every K in ks must be < the vocabulary size {vocab}, got ks={self.ks}")
        index = torch.tensor(self.ks, device=teacher_logits.device)
        if self.tail_sum.device != teacher_logits.device:
            self.tail_sum = self.tail_sum.to(teacher_logits.device)
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
        n = int(self._own.state[0])
        out["tail_mass"] = {
            k: (float(s) / n if n else float("nan")) for k, s in zip(self.ks, self.tail_sum.cpu())
        }
        out["mismatch_rate"] = 1.0 - out["top1_accuracy"] if n else float("nan")
        out["num_tokens"] = n
        return out
