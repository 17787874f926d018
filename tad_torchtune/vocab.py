"""Vocabulary policy, shared by the losses, the models and the metrics: how a teacher's logits are
read over the student's vocabulary, and the check, before training, that they can be.

``"exact"``: the vocabulary sizes must match. ``"truncate_teacher"``: a teacher whose vocabulary
is larger than the student's, its first ids being the student's (padded embedding tables, as
Qwen2.5's), is cut to the student's before any softmax. ``teacher_id_merges`` (``IdMerges``): ids
of such a teacher past the student's vocabulary whose probability is added to a student id's
before the cut (Phi-3's end-of-text 32000 into Llama-2's 2), so the teacher's distribution over
the student's ids loses nothing there.
"""

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

VOCAB_ALIGNMENTS = ("exact", "truncate_teacher")


def check_vocab_alignment(value: str, *, key: str = "vocab_alignment") -> str:
    """``value`` if it is one of ``VOCAB_ALIGNMENTS``; else a ``ValueError`` naming ``key``."""
    if value not in VOCAB_ALIGNMENTS:
        raise ValueError(f"{key} must be one of {VOCAB_ALIGNMENTS}, got {value!r}")
    return value


def align_teacher_vocab(
    teacher_logits: Tensor, student_vocab_size: int, vocab_alignment: str
) -> Tensor:
    """Return teacher logits (or any ``[..., V_T]`` tensor indexed by teacher ids, e.g. the
    transposed output weight) over the student's vocabulary.

    Args:
        teacher_logits: ``[..., V_T]``.
        student_vocab_size: ``V_S``.
        vocab_alignment: one of ``VOCAB_ALIGNMENTS``.

    Returns:
        ``[..., V_S]`` (a view, no copy).

    Raises:
        ValueError: if the sizes differ and cannot be aligned.
    """
    teacher_vocab_size = teacher_logits.shape[-1]
    if teacher_vocab_size == student_vocab_size:
        return teacher_logits
    if vocab_alignment == "truncate_teacher" and teacher_vocab_size > student_vocab_size:
        return teacher_logits[..., :student_vocab_size]
    hint = (
        "set vocab_alignment='truncate_teacher' if the teacher's first ids are the student's "
        "vocabulary"
        if teacher_vocab_size > student_vocab_size
        else "a teacher vocabulary smaller than the student's cannot be aligned"
    )
    raise ValueError(
        f"vocabulary size mismatch: teacher has {teacher_vocab_size} logits, student has "
        f"{student_vocab_size} (vocab_alignment={vocab_alignment!r}); {hint}"
    )


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """The ids of ``text`` alone, without BOS or EOS, from a torchtune tokenizer: its
    ``encode(text, add_bos=False, add_eos=False)``, less the BOS and EOS that torchtune's
    ``HuggingFaceBaseTokenizer`` leaves in where its tokenizer.json adds them itself (a Llama 3
    tokenizer.json, or an export of this package, which prepends training's BOS)."""
    ids = list(tokenizer.encode(text, add_bos=False, add_eos=False))
    if getattr(tokenizer, "hf_adds_bos", False) and ids[:1] == [tokenizer.bos_id]:
        ids = ids[1:]
    if getattr(tokenizer, "hf_adds_eos", False) and ids[-1:] == [tokenizer.eos_id]:
        ids = ids[:-1]
    return ids


@dataclass(frozen=True)
class IdMerges:
    """``teacher_id_merges``: teacher ids past the student's vocabulary (``sources``), each
    merged into a student id (``targets``, one per source): the teacher's probability of a
    target becomes its own plus its sources', ``p'_j = p_j + sum_{s -> j} p_s``, i.e. its logit
    becomes the log-sum-exp of its and its sources' logits, before ``truncate_teacher`` cuts the
    sources away (``docs/design.md``, "Vocabularies"). On logits without a soft-cap; the result
    is the teacher's logits over the student's ids, which a divergence then divides by its
    temperature like any teacher's: at a temperature T other than 1 a target's tempered
    probability is ``(p_j + sum p_s)^(1/T)`` normalised, not the tempered teacher's merged."""

    sources: tuple[int, ...]
    targets: tuple[int, ...]

    def fold_(self, aligned: Tensor, source_logits: Tensor) -> Tensor:
        """Write into ``aligned`` ``[..., V_S]`` each target's merged logit, from the sources'
        logits ``source_logits`` ``[..., E]`` (in ``sources``' order), in float32 (float64
        stays), rounded once to ``aligned``'s dtype. Returns ``aligned``."""
        dtype = torch.promote_types(aligned.dtype, torch.float32)
        for target in dict.fromkeys(self.targets):
            cols = [i for i, t in enumerate(self.targets) if t == target]
            parts = torch.cat([aligned[..., target:target + 1].to(dtype),
                               source_logits[..., cols].to(dtype)], dim=-1)
            aligned[..., target] = torch.logsumexp(parts, dim=-1).to(aligned.dtype)
        return aligned

    def align_(self, teacher_logits: Tensor, student_vocab_size: int,
               vocab_alignment: str) -> Tensor:
        """``align_teacher_vocab`` of ``teacher_logits`` ``[..., V_T]`` with the sources
        merged first: a view of the teacher's logits, whose targets' columns are written."""
        source_logits = teacher_logits[..., list(self.sources)]
        aligned = align_teacher_vocab(teacher_logits, student_vocab_size, vocab_alignment)
        return self.fold_(aligned, source_logits)

    def as_config(self) -> dict[int, int]:
        """``{teacher_id: student_id}``, as the config writes it."""
        return dict(zip(self.sources, self.targets))


class MergedRows(NamedTuple):
    """The teacher's output-projection rows of ``IdMerges.sources`` (``weight`` ``[E, D]``,
    ``bias`` ``[E]`` or None), for heads that project hidden states chunk by chunk."""

    weight: Tensor
    bias: Tensor | None
    ids: IdMerges

    def apply_(self, aligned: Tensor, hidden: Tensor) -> Tensor:
        """``IdMerges.fold_`` of a chunk's projection ``aligned`` ``[n, V_S]`` (written) of
        the hidden states ``hidden`` ``[n, D]``."""
        source_logits = torch.nn.functional.linear(hidden.to(self.weight.dtype), self.weight,
                                                   self.bias)
        return self.ids.fold_(aligned, source_logits)


def check_merges_softcap(merges: IdMerges | None, softcap: float | None) -> None:
    """Refuse merges with a teacher that soft-caps its logits (Gemma2's): a head projecting
    chunks merges before the cap, the model's logits after it.

    Raises:
        ValueError: ``teacher_id_merges: ...``.
    """
    if merges is not None and softcap is not None:
        raise ValueError(f"teacher_id_merges: {merges.as_config()!r} with a teacher that "
                         f"soft-caps its logits ({softcap}); accepted: a teacher without a "
                         f"logit soft-cap")


def check_teacher_id_merges(value: Mapping[Any, Any] | None, *, teacher_vocab_size: int,
                            student_vocab_size: int, vocab_alignment: str,
                            key: str = "teacher_id_merges") -> IdMerges | None:
    """``teacher_id_merges`` as ``IdMerges``, or None when unset or empty.

    Raises:
        ValueError: naming ``key`` (``teacher_id_merges.32000``), the value and what is
            accepted: a teacher id inside the student's vocabulary (its mass would count twice)
            or past the teacher's, a target outside the student's, or no ``truncate_teacher``.
    """
    if not value:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"{key}: must be a mapping {{teacher_id: student_id}}, got {value!r}")
    if vocab_alignment != "truncate_teacher" or teacher_vocab_size <= student_vocab_size:
        raise ValueError(f"{key}: {dict(value)!r} merges teacher ids past the student's "
                         f"vocabulary, but vocab_alignment is {vocab_alignment!r} with "
                         f"{teacher_vocab_size} teacher ids and {student_vocab_size} student ids; "
                         f"accepted: vocab_alignment truncate_teacher and a larger teacher")
    sources, targets = [], []
    for raw, target in value.items():
        try:
            source = int(raw)
        except (TypeError, ValueError):
            source = None
        if source is None or str(source) != str(raw).strip():
            raise ValueError(f"{key}: {raw!r} is not a teacher id; accepted: integer ids from "
                             f"{student_vocab_size} to {teacher_vocab_size - 1}")
        if source in sources:
            raise ValueError(f"{key}.{source}: listed twice ({list(value)!r}); accepted: each "
                             f"teacher id once")
        if not student_vocab_size <= source < teacher_vocab_size:
            raise ValueError(f"{key}.{source}: not past the student's {student_vocab_size} ids "
                             f"within the teacher's {teacher_vocab_size}; accepted: teacher ids "
                             f"from {student_vocab_size} to {teacher_vocab_size - 1} (an id the "
                             f"student has keeps its own probability)")
        if isinstance(target, bool) or not isinstance(target, int) or \
                not 0 <= target < student_vocab_size:
            raise ValueError(f"{key}.{source}: {target!r}; accepted: a student id from 0 to "
                             f"{student_vocab_size - 1}")
        sources.append(source)
        targets.append(target)
    return IdMerges(tuple(sources), tuple(targets))


def _spm(tok: Any) -> Any:
    # torchtune's SentencePiece tokenizers wrap ``SentencePieceBaseTokenizer`` as ``_spm_model``,
    # which wraps the ``sentencepiece`` processor as ``spm_model``.
    inner = getattr(tok, "_spm_model", tok)
    return getattr(inner, "spm_model", None)


def _token_lookups(tok: Any) -> dict[str, Callable[[int], str | None]]:
    """Ways to read the token string of an id, most specific first (kind -> function)."""
    specials = {v: k for k, v in (getattr(tok, "special_tokens", None) or {}).items()}
    found: dict[str, Callable[[int], str | None]] = {}
    if hasattr(tok, "id_to_token"):  # tokenizers.Tokenizer
        found["id_to_token"] = tok.id_to_token
    if hasattr(tok, "convert_ids_to_tokens"):  # transformers tokenizers
        found["id_to_token"] = found.get("id_to_token") or tok.convert_ids_to_tokens
    if isinstance(getattr(tok, "decoder", None), dict):  # torchtune Qwen2Tokenizer (byte BPE)
        found["bpe"] = lambda i: tok.decoder.get(i, specials.get(i))
    spm = _spm(tok)
    if spm is not None and hasattr(spm, "id_to_piece"):
        size = spm.get_piece_size()
        found["spm"] = lambda i: spm.id_to_piece(i) if i < size else specials.get(i)
    tt = getattr(getattr(tok, "tt_model", None), "tt_model", None)
    if tt is not None:  # torchtune tiktoken tokenizers
        base = getattr(tok.tt_model, "base_vocab_size", None)

        def tiktoken_piece(i: int) -> str | None:
            if i in specials:
                return specials[i]
            if base is not None and i >= base:
                return None
            return repr(tt.decode_single_token_bytes(i))

        found["tiktoken"] = tiktoken_piece
    if hasattr(tok, "decode"):
        found["decode"] = lambda i: tok.decode([i])
    return found


def _common_lookup(teacher_tokenizer: Any, student_tokenizer: Any):
    t, s = _token_lookups(teacher_tokenizer), _token_lookups(student_tokenizer)
    for kind in t:
        if kind in s:
            return kind, t[kind], s[kind]
    raise ValueError(
        f"cannot compare tokenizers: no common way to read token strings (teacher tokenizer "
        f"{type(teacher_tokenizer).__name__} offers {list(t)}, student tokenizer "
        f"{type(student_tokenizer).__name__} offers {list(s)})"
    )


def _safe(lookup: Callable[[int], str | None], i: int) -> str | None:
    try:
        return lookup(i)
    except Exception:  # an id outside a tokenizer's range reads as "no token"
        return None


def check_vocab_compat(
    teacher_vocab_size: int,
    student_vocab_size: int,
    vocab_alignment: str,
    teacher_tokenizer: Any = None,
    student_tokenizer: Any = None,
    *,
    sample: int = -1,
    seed: int = 0,
) -> None:
    """Raise if the teacher's logits cannot be compared with the student's id by id.

    Sizes: equal, or the teacher larger with ``vocab_alignment="truncate_teacher"`` (its first
    ``student_vocab_size`` ids are then taken to be the student's vocabulary; see
    ``align_teacher_vocab``). Tokenizers (when both are given): the token
    string of every id in a sample of the shared range must agree. The sample holds the first
    and last 64 shared ids plus ``sample`` random ones (``seed``); ``sample=-1`` (the default:
    a 32000-id vocabulary takes about 10 ms) checks them all.
    Ids that neither tokenizer knows (embedding rows padded past the tokenizer) are skipped.

    Args:
        teacher_vocab_size: rows of the teacher's output projection.
        student_vocab_size: rows of the student's output projection.
        vocab_alignment: one of ``VOCAB_ALIGNMENTS``.
        teacher_tokenizer: optional; a torchtune, ``tokenizers`` or ``transformers`` tokenizer.
        student_tokenizer: optional; same kinds.
        sample: how many random shared ids to compare besides the first and last 64; -1: all.
        seed: seed of that sample.

    Raises:
        ValueError: naming both sides, when the sizes cannot be aligned or the tokenizers map a
            sampled id to different tokens.
    """
    check_vocab_alignment(vocab_alignment)
    if teacher_vocab_size != student_vocab_size:
        if teacher_vocab_size > student_vocab_size and vocab_alignment == "truncate_teacher":
            pass
        elif teacher_vocab_size > student_vocab_size:
            raise ValueError(
                f"vocabulary size mismatch: teacher has {teacher_vocab_size} ids, student has "
                f"{student_vocab_size} (vocab_alignment={vocab_alignment!r}); set "
                f"vocab_alignment='truncate_teacher' if the teacher's first "
                f"{student_vocab_size} ids are the student's vocabulary"
            )
        else:
            raise ValueError(
                f"vocabulary size mismatch: teacher has {teacher_vocab_size} ids, student has "
                f"{student_vocab_size}; a teacher vocabulary smaller than the student's cannot "
                f"be aligned (vocab_alignment={vocab_alignment!r})"
            )
    if teacher_tokenizer is None or student_tokenizer is None:
        return

    shared = min(teacher_vocab_size, student_vocab_size)
    if sample < 0 or shared <= 128 + sample:
        ids = list(range(shared))
    else:
        middle = random.Random(seed).sample(range(64, shared - 64), sample)
        ids = [*range(64), *sorted(middle), *range(shared - 64, shared)]
    kind, t_lookup, s_lookup = _common_lookup(teacher_tokenizer, student_tokenizer)
    mismatches = []
    compared = 0
    for i in ids:
        t, s = _safe(t_lookup, i), _safe(s_lookup, i)
        compared += t is not None or s is not None  # an id neither knows is not compared
        if t != s:
            mismatches.append(f"id {i}: teacher {t!r} vs student {s!r}")
    if mismatches:
        shown = "; ".join(mismatches[:5])
        raise ValueError(
            f"teacher tokenizer ({type(teacher_tokenizer).__name__}) and student tokenizer "
            f"({type(student_tokenizer).__name__}) disagree on {len(mismatches)} of the "
            f"{compared} {'sampled ' if len(ids) < shared else ''}shared ids either knows "
            f"(compared by {kind}): {shown}. Distillation compares logits id "
            f"by id, so both models must use the same vocabulary for the shared ids"
        )


#: prose the two tokenizers of a distillation should split alike (no special-token strings, which
#: tokenizers may treat as specials or as text)
SPLIT_PROBE = ("The quick brown fox jumps over the lazy dog. 0123456789 3.14159 $1,000,000 "
               "(a+b)*c=d;\n\tNaive cafe, facade; Tokyo, Seoul!\n    indented   code():  "
               "return x[i] != y  # comment\n")


def tokenizer_warnings(teacher_tokenizer: Any, student_tokenizer: Any, student_vocab_size: int,
                       vocab_alignment: str, merges: IdMerges | None = None) -> list[str]:
    """What a user should know about a ``teacher_tokenizer`` beside the student's, one line each
    (empty when nothing), after ``check_vocab_compat`` passed: the teacher reads the STUDENT's
    token ids, so a teacher tokenizer that splits text otherwise sees splits it was not trained
    on; and an end-of-text id of the teacher past the student's vocabulary is cut away by
    ``truncate_teacher``, so where a label is the student's end-of-text the teacher's
    end-of-text mass is not among the ids the student is distilled on, unless ``merges``
    (``teacher_id_merges``) merges it into a student id.

    Args:
        teacher_tokenizer, student_tokenizer: torchtune tokenizers (``encode(text, add_bos,
            add_eos)``, ``eos_id``).
        student_vocab_size: rows of the student's output projection.
        vocab_alignment: one of ``VOCAB_ALIGNMENTS``.
        merges: the run's ``teacher_id_merges``, or None.
    """
    out = []
    try:
        teacher_ids = encode_text(teacher_tokenizer, SPLIT_PROBE)
        student_ids = encode_text(student_tokenizer, SPLIT_PROBE)
    except (AttributeError, TypeError):  # not torchtune tokenizers: nothing to compare
        return out
    if teacher_ids != student_ids:
        first = next((i for i, (a, b) in enumerate(zip(teacher_ids, student_ids)) if a != b),
                     min(len(teacher_ids), len(student_ids)))
        out.append(
            f"teacher_tokenizer: splits text otherwise than tokenizer (a probe sentence: "
            f"{len(teacher_ids)} ids against {len(student_ids)}, the first difference at position "
            f"{first}: {teacher_ids[first:first + 4]} against {student_ids[first:first + 4]}); "
            f"the teacher reads the student's ids, split as it was not trained on")
    teacher_eos = getattr(teacher_tokenizer, "eos_id", None)
    student_eos = getattr(student_tokenizer, "eos_id", None)
    if (teacher_eos is not None and student_eos is not None and teacher_eos != student_eos
            and teacher_eos >= student_vocab_size and vocab_alignment == "truncate_teacher"
            and teacher_eos not in (merges.sources if merges else ())):
        out.append(
            f"teacher_tokenizer: the teacher's end-of-text id {teacher_eos} is past the "
            f"student's {student_vocab_size} ids, which truncate_teacher keeps: where a label is "
            f"the student's end-of-text ({student_eos}) the teacher's end-of-text mass is cut "
            f"away and its other ids are renormalised; teacher_id_merges "
            f"'{{{teacher_eos}: {student_eos}}}' adds it to the student's end-of-text")
    target = merges.as_config().get(teacher_eos) if merges else None
    if target is not None and student_eos is not None and target != student_eos:
        out.append(
            f"teacher_id_merges: the teacher's end-of-text {teacher_eos} is merged into id "
            f"{target}, not the student's end-of-text {student_eos}")
    return out


def check_teacher_tokenizer(teacher_tokenizer: Any, tokenizer: Any, teacher_vocab_size: int,
                            student_vocab_size: int, vocab_alignment: str,
                            merges: IdMerges | None = None) -> list[str]:
    """A recipe's ``teacher_tokenizer`` against its ``tokenizer`` (the students'):
    ``check_vocab_compat`` of the two, then ``tokenizer_warnings``. Sizes that cannot be
    aligned are left to the recipe's size check, which names the model (nothing checked here).

    Returns:
        The warning lines (none without a ``teacher_tokenizer``).

    Raises:
        ValueError: ``teacher_tokenizer: ...``, for shared ids the two map to other tokens.
    """
    if teacher_tokenizer is None:
        return []
    try:
        check_vocab_compat(teacher_vocab_size, student_vocab_size, vocab_alignment)
    except ValueError:
        return []
    try:
        check_vocab_compat(teacher_vocab_size, student_vocab_size, vocab_alignment,
                           teacher_tokenizer, tokenizer)
    except ValueError as err:
        raise ValueError(f"teacher_tokenizer: {err}") from None
    return tokenizer_warnings(teacher_tokenizer, tokenizer, student_vocab_size, vocab_alignment,
                              merges)
