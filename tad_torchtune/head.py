"""Run a model and compute its terms: the library side of a distillation step.

``TeacherHead`` runs the frozen teacher (no autograd) and returns what the student's losses read,
over the STUDENT's vocabulary (a larger teacher's aligned here, the one place): its final normed
hidden state and output weight and bias (the fused path projects them chunk by chunk), or its
logits (the unfused path and evaluation), and the hidden states of chosen layers.
``StudentHead`` owns the student: ``forward`` runs it and returns its training terms, the
objective ``clm_weight * CE + kd_weight * divergence + hidden_weight * hidden`` summed over valid
tokens; ``evaluate`` adds a batch to the held-out metrics (``tad_torchtune.metrics``). It knows
the output weight, the soft-cap and the fused path, and holds nothing specific to a divergence
or a teacher cache: the divergence validates itself, the cache's entries adapt it
(``docs/design.md``, "One step").

Under FSDP2 the ``StudentHead`` is the root of the student's sharding, so the parameters outside
the blocks (embeddings, final norm, output projection) are gathered for its whole ``forward``
and ``evaluate`` (registered as an FSDP forward method by ``parallel.parallelize``): the fused
path reads the output weight itself, not just its logits.
"""

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from tad_torchtune.common import full_tensor
from tad_torchtune.data.batch import Batch
from tad_torchtune.losses import DEFAULT_CHUNK_SIZE, Divergence, DivergenceOutput
from tad_torchtune.losses.ce import chunked_cross_entropy
from tad_torchtune.losses.fused import DEFAULT_TEACHER_CACHE_MIB, fused_head
from tad_torchtune.metrics import StudentMetrics
from tad_torchtune.models import (
    forward_hidden,
    logit_softcap,
    output_bias,
    output_weight,
    project_logits,
)
from tad_torchtune.vocab import (
    IdMerges,
    MergedRows,
    align_teacher_vocab,
    check_merges_softcap,
    check_vocab_alignment,
)


@dataclass
class TeacherOutput:
    """What the teacher gives the student's losses for one batch (no autograd), over the
    student's vocabulary.

    Attributes:
        hidden: ``[B, T, D_T]`` final normed hidden state.
        weight: ``[V, D_T]`` output projection weight.
        bias: ``[V]`` output projection bias, or None.
        softcap: the teacher's logit soft-cap, or None.
        logits: ``[B, T, V]`` in the model's dtype, when asked for (``teacher_id_merges``
            merged in).
        layers: hidden states of the requested layers (the hidden-state loss).
        merge: the output-projection rows of ``teacher_id_merges``' teacher ids, which a head
            projecting ``hidden`` by ``weight`` folds into each chunk; None without merges.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    softcap: float | None
    logits: Tensor | None = None
    layers: list[Tensor] = field(default_factory=list)
    merge: MergedRows | None = None


class TeacherHead:
    """Runs the frozen teacher of a distillation.

    Args:
        model: the teacher, a torchtune ``TransformerDecoder`` in eval mode.
        vocab_size: the student's vocabulary size: what the teacher's outputs are aligned to.
        vocab_alignment: ``"exact"`` or ``"truncate_teacher"`` (``tad_torchtune.vocab``).
        hidden_layers: layers whose input hidden state the hidden-state loss reads (-1: the
            final normed hidden state).
        merges: ``teacher_id_merges`` (``tad_torchtune.vocab.IdMerges``), or None.

    Raises:
        ValueError: merges with a teacher that soft-caps its logits (Gemma2's), where a head
            projecting chunks would merge before the cap and the logits after it.
    """

    def __init__(self, model: nn.Module, *, vocab_size: int, vocab_alignment: str = "exact",
                 hidden_layers: tuple[int, ...] = (), merges: IdMerges | None = None) -> None:
        self.model = model
        self.vocab_size = int(vocab_size)
        self.vocab_alignment = check_vocab_alignment(vocab_alignment)
        self.hidden_layers = tuple(hidden_layers)
        self.softcap = logit_softcap(model)
        self.merges = merges
        check_merges_softcap(merges, self.softcap)

    def _aligned(self, x: Tensor) -> Tensor:
        return align_teacher_vocab(x, self.vocab_size, self.vocab_alignment)

    @torch.no_grad()
    def __call__(self, batch: Batch, *, logits: bool) -> TeacherOutput:
        h, layers = forward_hidden(self.model, batch.tokens, mask=batch.mask,
                                   input_pos=batch.input_pos, hidden_layers=self.hidden_layers)
        weight, bias = full_tensor(output_weight(self.model)), output_bias(self.model)
        bias = None if bias is None else full_tensor(bias)
        merge = z = None
        if logits:
            z = project_logits(self.model, h)
            z = (self._aligned(z) if self.merges is None else
                 self.merges.align_(z, self.vocab_size, self.vocab_alignment))
        if self.merges is not None:
            rows = list(self.merges.sources)
            merge = MergedRows(weight[rows], None if bias is None else bias[rows], self.merges)
        return TeacherOutput(
            hidden=h, weight=self._aligned(weight.t()).t(),
            bias=None if bias is None else self._aligned(bias),
            softcap=self.softcap, layers=layers, logits=z, merge=merge)


@dataclass
class TrainTerms:
    """One micro-batch's training terms, sums over its valid tokens.

    Attributes:
        objective: ``clm_weight * ce + kd_weight * kd + hidden_weight * hidden`` (scalar,
            differentiable w.r.t. the student).
        ce, kd, hidden: the three sums, detached (``kd`` / ``hidden`` None when unused).
        stats: the divergence's diagnostics, sums over valid tokens (detached).
        num_tokens: valid tokens (scalar int64).
    """

    objective: Tensor
    ce: Tensor
    kd: Tensor | None
    hidden: Tensor | None
    stats: dict[str, Tensor]
    num_tokens: Tensor


# StudentHead is the student's FSDP2 root and returns TrainTerms. FSDP2 gathers the root's
# parameters again for backward from hooks on the forward's outputs, which torch 2.11 finds with
# pytree's ``tree_flatten`` (2.13 also looks into dataclasses): unregistered, the objective was a
# hidden leaf, no hook fired, and backward read a freed output weight ("setStorage ... out of
# bounds for storage of size 0") on every run of 2 processes or more.
pytree.register_dataclass(TrainTerms)


class StudentHead(nn.Module):
    """The student with its losses: ``forward`` gives a batch's ``TrainTerms``, ``evaluate``
    adds it to held-out metrics. See the module docstring.

    Args:
        student: the student ``TransformerDecoder``.
        kd_loss: a ``Divergence`` or None (no distillation term).
        hidden_loss: ``HiddenCosineLoss`` or None.
        clm_weight, kd_weight, hidden_weight: weights of the objective.
        hidden_layers: student layers paired with the teacher's for the hidden loss.
        fused: compute CE and divergence from hidden states and output weights
            (``losses.fused.fused_head``) instead of materialised logits.
        chunk_size: tokens per loss chunk, on every path (the recipe's ``loss_chunk_size``).
        teacher_cache_mib, float32_weight_grad: the fused head's options.
        compile: ``torch.compile`` the unfused divergence (whole), or the fused head's chunks.
        from_cache: the divergence reads the teacher-cache entries every batch carries
            (``Batch.teacher``) instead of a live teacher.
    """

    #: methods FSDP2 must treat like ``forward`` (gathering the root's parameters)
    fsdp_forward_methods = ("evaluate",)

    def __init__(
        self,
        student: nn.Module,
        *,
        kd_loss: Divergence | None = None,
        hidden_loss: nn.Module | None = None,
        clm_weight: float = 1.0,
        kd_weight: float = 1.0,
        hidden_weight: float = 0.0,
        hidden_layers: tuple[int, ...] = (),
        fused: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        teacher_cache_mib: float | None = DEFAULT_TEACHER_CACHE_MIB,
        float32_weight_grad: bool = True,
        compile: bool = False,
        from_cache: bool = False,
    ) -> None:
        super().__init__()
        self.student = student
        self.kd_loss = kd_loss if kd_weight > 0 else None
        self.hidden_loss = hidden_loss if hidden_weight > 0 else None
        self.weights = (float(clm_weight), float(kd_weight), float(hidden_weight))
        self.hidden_layers = tuple(hidden_layers) if self.hidden_loss is not None else ()
        self.fused = bool(fused)
        self.chunk_size = int(chunk_size)
        self.fused_options = {"teacher_cache_mib": None if teacher_cache_mib is None
                              else float(teacher_cache_mib),
                              "float32_weight_grad": bool(float32_weight_grad),
                              "compile_chunks": bool(compile)}
        self.from_cache = bool(from_cache)
        # The unfused divergence is compiled whole (chunk loop and recomputation included).
        self._kd_sum_and_count = None
        if self.kd_loss is not None:
            fn = self.kd_loss.sum_and_count
            self._kd_sum_and_count = torch.compile(fn) if compile and not self.fused else fn
        self.softcap = logit_softcap(student)

    @property
    def needs_teacher_logits(self) -> bool:
        """Whether ``forward`` reads the teacher's logits (the unfused path with a live teacher)."""
        return self.kd_loss is not None and not self.fused and not self.from_cache

    @property
    def needs_teacher(self) -> bool:
        """Whether ``forward`` needs the live teacher's output at all."""
        return (self.kd_loss is not None and not self.from_cache) or self.hidden_loss is not None

    def forward(self, batch: Batch, teacher: TeacherOutput | None) -> TrainTerms:
        """The training terms of one micro-batch.

        Args:
            batch: the micro-batch (``Batch``; its ``teacher`` entries with ``from_cache``).
            teacher: the teacher's output for the batch (None when ``needs_teacher`` is False).

        Returns:
            ``TrainTerms``.
        """
        clm_w, kd_w, hidden_w = self.weights
        labels = batch.labels
        h, layers = forward_hidden(self.student, batch.tokens, mask=batch.mask,
                                   input_pos=batch.input_pos, hidden_layers=self.hidden_layers)
        kd: DivergenceOutput | None = None
        cache = batch.teacher if self.from_cache else None
        live = self.kd_loss is not None and cache is None
        if self.fused:
            out = fused_head(
                h, output_weight(self.student), labels, divergence=self.kd_loss,
                teacher_hidden=teacher.hidden if live else None,
                teacher_weight=teacher.weight if live else None, teacher_cache=cache,
                student_bias=output_bias(self.student),
                teacher_bias=teacher.bias if live else None,
                ce_weight=clm_w, kd_weight=kd_w, compute_ce=True, student_softcap=self.softcap,
                teacher_softcap=teacher.softcap if live else None,
                teacher_merge=teacher.merge if live else None,
                document_ids=batch.document_ids, chunk_size=self.chunk_size,
                **self.fused_options)
            objective, ce, kd, n = out.objective, out.ce, out.kd, out.num_tokens
        else:
            logits = project_logits(self.student, h)  # (B, T, V) in the model dtype
            ce, n = chunked_cross_entropy(logits, labels, chunk_size=self.chunk_size)
            objective = clm_w * ce
            if self.kd_loss is not None:
                kd = self._kd_sum_and_count(
                    logits, cache if cache is not None else teacher.logits, labels,
                    document_ids=batch.document_ids, chunk_size=self.chunk_size)
                objective = objective + kd_w * kd.total
        hidden_sum = None
        if self.hidden_loss is not None:
            hidden_sum = sum(self.hidden_loss.sum_and_count(s_h, t_h, labels).total
                             for s_h, t_h in zip(layers, teacher.layers))
            objective = objective + hidden_w * hidden_sum
        return TrainTerms(
            objective=objective, ce=ce.detach(),
            kd=None if kd is None else kd.total.detach(),
            hidden=None if hidden_sum is None else hidden_sum.detach(),
            stats={} if kd is None else dict(kd.stats), num_tokens=n)

    @torch.no_grad()
    def evaluate(self, batch: Batch, teacher: TeacherOutput, metrics: StudentMetrics) -> None:
        """Add one held-out batch to ``metrics``: from logits, or on the fused path from hidden
        states and output weights, chunk by chunk, so ``[B, T, V]`` logits never exist."""
        h, _ = forward_hidden(self.student, batch.tokens, mask=batch.mask,
                              input_pos=batch.input_pos)
        if teacher.logits is None:
            metrics.update_from_hidden(
                h, output_weight(self.student), teacher.hidden, teacher.weight, batch.labels,
                student_bias=output_bias(self.student), teacher_bias=teacher.bias,
                student_softcap=self.softcap, teacher_softcap=teacher.softcap,
                teacher_merge=teacher.merge)
        else:
            metrics.update(project_logits(self.student, h), teacher.logits, batch.labels)

    def new_metrics(self, **kwargs: Any) -> StudentMetrics:
        """Held-out metrics with this head's chunk size (the teacher's outputs are aligned)."""
        return StudentMetrics(chunk_size=self.chunk_size, **kwargs)
