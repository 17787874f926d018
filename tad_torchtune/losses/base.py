"""The contract every divergence of this package keeps, and its registry (``docs/design.md``,
"The divergence contract")."""

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from tad_torchtune.checks import check_positive
from tad_torchtune.common import IGNORE_INDEX
from tad_torchtune.errors import ConfigError
from tad_torchtune.losses.engine import (
    DEFAULT_CHUNK_SIZE,
    DivergenceOutput,
    check_logits,
    logits_teacher_pass,
    reduce_chunks,
)
from tad_torchtune.losses.terms import TopK

#: every divergence class by its ``name``: what the config check, the benchmark and the tests
#: iterate over. A subclass with a ``name`` registers itself when its module is imported.
DIVERGENCES: dict[str, type["Divergence"]] = {}

#: the kinds of teacher cache (``tad_torchtune.teacher_cache``): a top-M bucket, or top-K plus
#: ids sampled from the tail
CACHE_MODES = ("top_m", "sampled")


@dataclass(frozen=True)
class CacheSpec:
    """What a teacher cache offers a divergence.

    Attributes:
        mode: one of ``CACHE_MODES``.
        top_m: ids stored exactly per position (the bucket cache's M, the sampled cache's K).
        temperature: the temperature its log-probabilities (and draws) are at.
        where: how the message names it (``teacher_cache_dir='...'``).
    """

    mode: str
    top_m: int
    temperature: float
    where: str = "teacher_cache_dir"


@dataclass(frozen=True)
class DivergenceUse:
    """What a divergence is used with, for its ``validate`` hook.

    Attributes:
        vocab_size: the student's vocabulary (the teacher's is aligned to it first).
        cache: the teacher cache it reads instead of teacher logits, or None.
        fused: whether it runs in the fused head.
        packed_rows: the rows of a batch hold several sequences packed together (torchtune's
            ``packed: true`` datasets), so a row statistic spans documents.
        key: the dotted config key of the divergence, named by the messages.
        prog: the command whose warnings these are (their lines start with it).
    """

    vocab_size: int
    cache: CacheSpec | None = None
    fused: bool = False
    packed_rows: bool = False
    key: str = "kd_loss"
    prog: str = "tad_distill"


class TailWeight(NamedTuple):
    """How a divergence of the form ``D_KL1 + w * D_KL2`` weighs its tail term.

    Attributes:
        weight: ``[B, T]`` the per-token ``w`` (no gradient).
        stats: per-token diagnostics ``[B, T]`` that come with it (TAD's ``abar``).
    """

    weight: Tensor
    stats: dict[str, Tensor]


class Divergence(nn.Module):
    """Base of the logit divergences; ``forward`` is the mean over valid tokens.

    A divergence is its per-chunk math and one validation hook; everything else (chunking,
    masking, the fused head, the teacher caches) is the engine's and the adapters' (``engine.py``,
    ``fused.py``, ``cached.py``):

    - ``chunk_fn(s, t, labels, *extras) -> (per_token [n], stats)``: the value on chunks
      ``[n, V]`` of student and teacher logits already divided by the temperature, in float32
      (float64 stays float64), ignored rows zeroed; ``labels`` are ids in ``[0, V)`` (an
      ignored row's is 0). The unfused path differentiates it with autograd: it is the
      reference. ``V`` may be an outcome space other than the vocabulary (a teacher cache's
      ranked outcomes), so a chunk function reads the teacher's top-K from its ``extras``,
      never by sorting ``t`` itself.
    - ``chunk_grad_fn(s, t, labels, *extras, ce_weight=None)`` (optional): the same value AND
      its gradient w.r.t. ``s`` in closed form, ``(per_token, stats, grad [n, V])``, held
      against autograd of ``chunk_fn`` by the tests. With ``ce_weight = c`` (temperature 1) it
      also returns the per-token cross-entropy ``LSE(s) - s_y`` and ``grad`` is that of
      ``divergence + c * CE``, so the fused head spends no pass over ``[n, V]`` on the CE.
      ``s`` is read only; ``t`` is the chunk's own buffer and may be overwritten.
    - ``top_k`` (optional, TAD's ``S_K``): the chunk function's extras begin with the
      teacher's ``TopK`` split of each position (``terms.TopK``: ids, LSE, tail LSE), which every
      teacher side provides (logits, projections, a cache); ``sequence_extras`` turns that of
      every position of the batch into the rest of the extras (TAD's normaliser over a row).
    - ``tail_weight`` (optional): for a divergence of the form ``D_KL1 + w * D_KL2`` (TAD,
      forward KL with ``w = alphaT``), its ``w``: what a sampled teacher cache estimates.
    - ``validate(use)``: raise the one-line ``ConfigError`` naming the dotted key when the
      divergence cannot serve ``use`` (the vocabulary, the cache, the fused head).

    ``reads_labels``: the per-chunk math reads the label (DRKL), so a cache adapter keeps the
    label as an outcome of its own. ``gpu_inductor_options``: inductor settings for the fused
    head's compiled chunk on a GPU beside ``fused.INDUCTOR_OPTIONS`` (DRKL's). A new divergence
    is one subclass with a ``name`` (it joins ``DIVERGENCES``) that sets ``chunk_fn``; see
    ``docs/design.md``.

    Args:
        temperature: both logits are divided by it before the softmax; no ``tau**2`` scaling.
        ignore_index: label value of tokens that do not count.
    """

    #: registry name (``DIVERGENCES``); empty for abstract bases
    name: ClassVar[str] = ""
    #: names of the per-token diagnostics in ``DivergenceOutput.stats``
    stat_names: ClassVar[tuple[str, ...]] = ()
    reads_labels: ClassVar[bool] = False
    gpu_inductor_options: ClassVar[dict] = {}
    top_k: int | None = None
    chunk_fn = None
    chunk_grad_fn = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            known = DIVERGENCES.get(cls.name)
            if known is not None and (known.__module__, known.__qualname__) != (
                    cls.__module__, cls.__qualname__):  # not the same class imported again
                raise ValueError(f"{cls.__module__}.{cls.__qualname__}: the divergence name "
                                 f"{cls.name!r} is {known.__module__}.{known.__qualname__}'s; "
                                 f"accepted: a name of its own")
            DIVERGENCES[cls.name] = cls

    def __init__(self, *, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.temperature = check_positive(temperature, "temperature")
        self.ignore_index = int(ignore_index)

    def sequence_extras(self, top: TopK, valid: Tensor, groups: Tensor | None = None
                        ) -> tuple[Tensor, ...]:
        """The per-token extras ``[B, T, ...]`` that follow the ``TopK`` ones, from the ``TopK``
        of every position ``[B, T, ...]``; ``valid`` ``[B, T]`` bool, ``groups`` ``[B, T]``
        document ids within each row (None: a row is one sequence). Only with ``top_k``."""
        return ()

    def tail_weight(self, log_alpha_t: Tensor, valid: Tensor, groups: Tensor | None = None
                    ) -> TailWeight | None:
        """``w`` of ``D_KL1 + w * D_KL2`` from the teacher's log tail masses ``[B, T]`` outside
        its top-K, or None when the divergence is not of that form."""
        return None

    def validate(self, use: DivergenceUse) -> None:
        """Raise ``ConfigError`` (``'kd_loss.KEY: ...'``) if the divergence cannot serve ``use``.

        The base checks what every divergence needs from a cache: its temperature, and for a
        sampled cache the ``D_KL1 + w * D_KL2`` form (reverse KL and DRKL need the teacher's
        log-probability at ids the student would choose, which draws from the teacher cannot
        estimate without bias).
        """
        if self.chunk_fn is None:  # a subclass written without its per-chunk math
            raise ConfigError(
                f"{use.key}._component_: {type(self).__module__}.{type(self).__name__} sets no "
                f"chunk_fn; accepted: a Divergence subclass that sets chunk_fn (docs/design.md, "
                f"'The divergence contract')")
        cache = use.cache
        if cache is None:
            return
        if cache.temperature != self.temperature:
            raise ConfigError(
                f"{use.key}.temperature: {self.temperature} differs from the teacher cache's "
                f"{cache.temperature} ({cache.where}); make the cache at this temperature")
        if cache.mode == "sampled" and type(self).tail_weight is Divergence.tail_weight:
            raise ConfigError(
                f"{use.key}._component_: {type(self).__name__} cannot be estimated from a sampled "
                f"teacher cache (cache_mode=sampled, {cache.where}): it needs the teacher's "
                f"log-probabilities at ids the student picks; use TADLoss or ForwardKLLoss, or a "
                f"cache made with cache_mode=top_m")

    def check(self, use: DivergenceUse) -> None:
        """``validate(use)``, then the contract itself on a tiny chunk of random logits, once, at
        a recipe's set-up (a divergence written outside this package is held to it here, not
        by a traceback or a wrong number in training): one value per position, the declared
        diagnostics, ``reads_labels`` set when the value reads the labels, and from a bucket
        cache (whose teacher outcomes are log-probabilities) a value unchanged when a
        constant is added to a position's teacher logits.

        Raises:
            ConfigError: naming ``use.key``.
        """
        self.validate(use)
        # on the host, whatever default device the caller set: under torch.device("cuda") (as
        # recipe_bench sets a recipe up) a CPU generator filling a CUDA tensor is refused
        with torch.device("cpu"):
            self._probe(use)

    def _probe(self, use: DivergenceUse) -> None:
        """``check``'s contract probe, on CPU tensors."""
        from tad_torchtune.errors import one_line

        name = f"{type(self).__module__}.{type(self).__name__}"
        where = "docs/design.md, 'The divergence contract'"
        vocab = (self.top_k or 0) + 6
        g = torch.Generator().manual_seed(0)
        s, t = (torch.randn(1, 5, vocab, generator=g, dtype=torch.float64) for _ in range(2))
        labels = torch.randint(0, vocab, (1, 5), generator=g)

        def value(teacher: Tensor, labels: Tensor) -> float:
            return float(self.sum_and_count(s, teacher, labels, chunk_size=None).total)

        try:
            base, again = value(t, labels), value(t, labels)
            other_labels = value(t, (labels + 1) % vocab)
            shifted = value(t + torch.randn(1, 5, 1, generator=g, dtype=torch.float64), labels)
        except (ValueError, TypeError, KeyError, AssertionError, RuntimeError, IndexError) as err:
            raise ConfigError(f"{use.key}._component_: {name} breaks the divergence contract on "
                              f"a chunk of random logits: {one_line(err)} ({where})") from None

        def differ(a: float, b: float) -> bool:
            return abs(a - b) > 1e-9 * (1 + abs(a))

        if use.cache is not None and use.cache.mode == "sampled":
            weight = self.tail_weight(torch.full((1, 5), -1.0, dtype=torch.float64),
                                      torch.ones(1, 5, dtype=torch.bool))
            served = {"dkl1", "dkl2", "tail_mass", *(weight.stats if weight else ())}
            unserved = sorted(set(self.stat_names) - served)
            if unserved:
                raise ConfigError(
                    f"{use.key}._component_: {name}'s diagnostics {unserved} cannot be computed "
                    f"from a sampled teacher cache ({use.cache.where}), which serves "
                    f"{sorted(served)}; accepted: a cache made with cache_mode=top_m, or the "
                    f"live teacher")
        if differ(base, again):  # a value that draws at random: nothing more to compare
            return
        if not self.reads_labels and differ(base, other_labels):
            raise ConfigError(f"{use.key}._component_: {name}'s value changes with the labels, "
                              f"but it does not set reads_labels = True (a teacher cache would "
                              f"give it no label: a wrong value, silently); accepted: a divergence "
                              f"that declares what it reads ({where})")
        if use.cache is not None and use.cache.mode == "top_m" and differ(base, shifted):
            raise ConfigError(f"{use.key}._component_: {name}'s value changes when a constant is "
                              f"added to a position's teacher logits, and a bucket teacher cache "
                              f"({use.cache.where}) holds log-probabilities; accepted: a "
                              f"divergence of the two distributions, or the live teacher")

    def sum_and_count(
        self, student_logits: Tensor, teacher, labels: Tensor, *,
        document_ids: Tensor | None = None, chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    ) -> DivergenceOutput:
        """Un-normalised sum over valid tokens, their count and the diagnostics' sums.

        Args:
            student_logits: ``[B, T, V]``.
            teacher: ``[B, T, V]`` teacher logits over the same vocabulary (align a larger one
                with ``tad_torchtune.vocab.align_teacher_vocab`` first), or a teacher cache's
                entries of these positions (``tad_torchtune.losses.cached``), at this
                divergence's temperature.
            labels: ``[B, T]``, already shifted (position t predicts ``labels[t]``).
            document_ids: ``[B, T]`` (optional) the document of each token within its row, for
                divergences whose row statistics can be per document.
            chunk_size: tokens upcast to float32 at once (``None``: all).
        """
        if not isinstance(teacher, Tensor):  # a teacher cache: its adapter
            return teacher.sum_and_count(self, student_logits, labels,
                                         document_ids=document_ids, chunk_size=chunk_size)
        check_logits(student_logits, teacher, labels)
        self.validate(DivergenceUse(vocab_size=student_logits.shape[-1], key=type(self).__name__))
        extras = logits_teacher_pass(self, teacher, labels, document_ids, chunk_size=chunk_size)
        return reduce_chunks(
            self.chunk_fn, (student_logits, teacher), labels, ignore_index=self.ignore_index,
            temperature=self.temperature, chunk_size=chunk_size, stat_names=self.stat_names,
            extras=extras)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> Tensor:
        """Mean over valid tokens of the per-token divergence (0 when no token is valid).

        Args:
            student_logits: ``[B, T, V]``.
            teacher_logits: ``[B, T, V]`` (or a teacher cache's entries, as ``sum_and_count``).
            labels: ``[B, T]``, already shifted (position t predicts ``labels[t]``).

        Returns:
            Scalar tensor.
        """
        return self.sum_and_count(student_logits, teacher_logits, labels).mean()

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, ignore_index={self.ignore_index}"
