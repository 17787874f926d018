"""The vocabulary policy (``vocab.py``): ``align_teacher_vocab`` cuts a larger teacher to the
student's vocabulary as a view; ``check_vocab_compat``: sizes, and tokenizers that must agree id by
id."""

import json

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from torchtune.models.llama2 import llama2_tokenizer
from torchtune.models.phi3 import phi3_mini_tokenizer
from torchtune.models.qwen2 import qwen2_tokenizer

from tad_torchtune.vocab import align_teacher_vocab, check_vocab_compat

WORDS = [f"w{i}" for i in range(300)]


def test_align_teacher_vocab_is_a_view():
    t = torch.randn(2, 3, 152064)
    out = align_teacher_vocab(t, 151936, "truncate_teacher")
    assert out.shape[-1] == 151936 and out.data_ptr() == t.data_ptr()
    with pytest.raises(ValueError, match="teacher has 152064 logits, student has 151936"):
        align_teacher_vocab(t, 151936, "exact")


def _wordlevel(words):
    return Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))


def test_equal_sizes_and_truncated_teacher_pass():
    check_vocab_compat(100, 100, "exact")
    check_vocab_compat(120, 100, "truncate_teacher")
    check_vocab_compat(100, 100, "truncate_teacher")


@pytest.mark.parametrize(
    "teacher,student,alignment,match",
    [
        (120, 100, "exact", r"teacher has 120 ids, student has 100.*truncate_teacher"),
        (100, 120, "truncate_teacher", r"teacher has 100 ids, student has 120.*smaller"),
        (100, 120, "exact", r"teacher has 100 ids, student has 120"),
    ],
)
def test_size_mismatch_names_both_sides(teacher, student, alignment, match):
    with pytest.raises(ValueError, match=match):
        check_vocab_compat(teacher, student, alignment)


def test_unknown_alignment_is_refused():
    with pytest.raises(ValueError, match=r"vocab_alignment must be one of .*'pad'"):
        check_vocab_compat(10, 10, "pad")


def test_tokenizers_agreeing_on_shared_ids_pass_with_a_larger_teacher():
    teacher = _wordlevel(WORDS + ["<extra1>", "<extra2>"])  # padded teacher vocabulary
    student = _wordlevel(WORDS)
    check_vocab_compat(302, 300, "truncate_teacher", teacher, student, sample=-1)


def test_tokenizer_disagreement_names_both_sides_and_the_id():
    swapped = list(WORDS)
    swapped[150], swapped[151] = swapped[151], swapped[150]
    with pytest.raises(ValueError) as err:
        check_vocab_compat(300, 300, "exact", _wordlevel(WORDS), _wordlevel(swapped), sample=-1)
    msg = str(err.value)
    assert "teacher tokenizer" in msg and "student tokenizer" in msg
    assert "id 150: teacher 'w150' vs student 'w151'" in msg
    assert "disagree on 2 of the 300 shared ids either knows" in msg
    # embedding rows past both tokenizers (a padded table) are not counted as compared
    with pytest.raises(ValueError, match="disagree on 2 of the 300 shared ids either knows"):
        check_vocab_compat(310, 310, "exact", _wordlevel(WORDS), _wordlevel(swapped))


def test_sampled_check_always_covers_both_ends():
    late = list(WORDS)
    late[-1] = "different"
    with pytest.raises(ValueError, match="id 299"):
        check_vocab_compat(300, 300, "exact", _wordlevel(WORDS), _wordlevel(late), sample=8)


def _qwen_files(tmp_path, tokens, name):
    # byte-level BPE as the Qwen2 tokenizer reads it: vocab.json + merges.txt
    folder = tmp_path / name
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def test_torchtune_qwen2_tokenizers(tmp_path):
    base = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    a = _qwen_files(tmp_path, base, "a")
    b = _qwen_files(tmp_path, base[:-2] + ["y!", "z!"], "b")
    tok_a = qwen2_tokenizer(str(a / "vocab.json"), str(a / "merges.txt"))
    tok_b = qwen2_tokenizer(str(b / "vocab.json"), str(b / "merges.txt"))
    check_vocab_compat(26, 26, "exact", tok_a, tok_a)
    with pytest.raises(ValueError, match=r"id 24: teacher 'y' vs student 'y!'"):
        check_vocab_compat(26, 26, "exact", tok_a, tok_b)


def _spm_model(tmp_path, name, text):
    import sentencepiece as spm

    corpus = tmp_path / f"{name}.txt"
    corpus.write_text(text)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / name), vocab_size=60,
        model_type="bpe", character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        minloglevel=2,
    )
    return str(tmp_path / f"{name}.model")


def test_torchtune_sentencepiece_tokenizers_phi3_teacher_llama2_student(tmp_path):
    """The Phi3-mini -> TinyLlama pairing: the teacher's tokenizer is the student's plus special
    tokens past its end (32064 vs 32000 ids in the real models)."""
    text = "the quick brown fox jumps over the lazy dog\n" * 50
    text += "pack my box with five dozen\n" * 50
    shared = _spm_model(tmp_path, "shared", text)
    other = _spm_model(tmp_path, "other", "completely different words live here\n" * 80)
    # phi3's tokenizer puts its special tokens at ids 32000+; this tiny one has 60 pieces
    specials = {"<|endoftext|>": 60, "<|assistant|>": 61}
    teacher = phi3_mini_tokenizer(shared, special_tokens_path=None)
    teacher.special_tokens = specials
    student = llama2_tokenizer(shared)
    check_vocab_compat(62, 60, "truncate_teacher", teacher, student, sample=-1)
    both = "teacher tokenizer .Phi3MiniTokenizer. and student tokenizer .Llama2Tokenizer."
    with pytest.raises(ValueError, match=both):
        check_vocab_compat(62, 60, "truncate_teacher", teacher, llama2_tokenizer(other), sample=-1)


class _Splitter:
    """A torchtune-like tokenizer: ids of the characters of a text, in pairs when ``pairs``."""

    def __init__(self, eos_id: int, pairs: bool = False):
        self.eos_id, self.pairs = eos_id, pairs

    def encode(self, text, add_bos=True, add_eos=True):
        if self.pairs:
            return [ord(text[i]) * 2 + 1 for i in range(0, len(text), 2)]
        return [ord(c) for c in text]


def test_tokenizer_warnings_name_other_splits_and_a_cut_end_of_text():
    from tad_torchtune.vocab import tokenizer_warnings

    assert tokenizer_warnings(_Splitter(2), _Splitter(2), 300, "exact") == []
    (split,) = tokenizer_warnings(_Splitter(2, pairs=True), _Splitter(2), 300, "exact")
    assert split.startswith("teacher_tokenizer: splits text otherwise than tokenizer (a probe "
                            "sentence: 87 ids against 173, the first difference at position 0: ")
    assert split.endswith("the teacher reads the student's ids, split as it was not trained on")
    # Phi-3 -> Llama-2: the teacher's end-of-text (32000) is past the student's 32000 ids
    (eos,) = tokenizer_warnings(_Splitter(32000), _Splitter(2), 32000, "truncate_teacher")
    assert eos.startswith("teacher_tokenizer: the teacher's end-of-text id 32000 is past the "
                          "student's 32000 ids, which truncate_teacher keeps: where a label is "
                          "the student's end-of-text (2) the teacher's end-of-text mass is cut")
    assert tokenizer_warnings(_Splitter(5), _Splitter(2), 32000, "truncate_teacher") == []


def test_the_phi3_teacher_and_llama2_student_tokenizers_split_alike(tmp_path):
    """The shipped Phi-3 -> TinyLlama pairing shares its SentencePiece model: no split warning,
    and the teacher's end-of-text past the student's ids is named."""
    from tad_torchtune.vocab import tokenizer_warnings

    shared = _spm_model(tmp_path, "shared", "the quick brown fox jumps over the lazy dog\n" * 50)
    teacher, student = phi3_mini_tokenizer(shared), llama2_tokenizer(shared)
    warnings = tokenizer_warnings(teacher, student, 60, "truncate_teacher")
    assert [w.split(":")[1].strip()[:11] for w in warnings] == ["the teacher"], warnings


def test_id_merges_add_the_teachers_probability_of_each_source_to_its_target():
    """``IdMerges.align_``: the aligned teacher's softmax over the student's ids is the full
    teacher's, each target's probability plus its sources', renormalised over what is kept
    (the sources and the cut ids without a target leave): against float64 probabilities."""
    from tad_torchtune.vocab import IdMerges

    v_s, v_t = 20, 26
    merges = IdMerges(sources=(20, 23, 21), targets=(2, 2, 5))
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(2, 3, v_t, generator=torch.Generator().manual_seed(0)) * 3
        logits[..., 20] += 4.0  # a source with much of the mass
        logits = logits.to(dtype)
        p = torch.softmax(logits.double(), -1)
        want = p[..., :v_s].clone()
        want[..., 2] += p[..., 20] + p[..., 23]
        want[..., 5] += p[..., 21]
        want /= want.sum(-1, keepdim=True)
        out = merges.align_(logits.clone(), v_s, "truncate_teacher")
        assert out.shape == (2, 3, v_s) and out.dtype == dtype
        got = torch.softmax(out.double(), -1)
        tol = 1e-6 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * 1e-2)
        # only the targets' columns change
        same = [i for i in range(v_s) if i not in (2, 5)]
        assert torch.equal(out[..., same], logits[..., same])
    # a source at -inf (a masked id) leaves its target as it was
    logits = torch.randn(4, v_t)
    logits[:, [20, 21, 23]] = float("-inf")
    out = merges.align_(logits.clone(), v_s, "truncate_teacher")
    torch.testing.assert_close(out, logits[:, :v_s], rtol=0, atol=1e-6)
    assert merges.as_config() == {20: 2, 23: 2, 21: 5}


def test_merged_rows_fold_a_projection_as_align_folds_the_logits():
    """``MergedRows.apply_`` on a chunk projected by the student's rows of the weight equals
    ``align_`` of the full projection (the fused head's and the metrics' path, and the logits
    path), with and without a bias."""
    from tad_torchtune.vocab import IdMerges, MergedRows

    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(7, 8, generator=g), torch.randn(26, 8, generator=g)
    b = torch.randn(26, generator=g)
    merges = IdMerges(sources=(25, 20), targets=(0, 19))
    for bias in (None, b):
        full = torch.nn.functional.linear(h, w, bias)
        want = merges.align_(full.clone(), 20, "truncate_teacher")
        rows = MergedRows(w[[25, 20]], None if bias is None else bias[[25, 20]], merges)
        cut = torch.nn.functional.linear(h, w[:20], None if bias is None else bias[:20])
        got = rows.apply_(cut, h)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("value,sizes,alignment,message", [
    ({32000: 2}, (32000, 32000), "truncate_teacher",
     "teacher_id_merges: {32000: 2} merges teacher ids past the student's vocabulary, but "
     "vocab_alignment is 'truncate_teacher' with 32000 teacher ids and 32000 student ids; "
     "accepted: vocab_alignment truncate_teacher and a larger teacher"),
    ({32000: 2}, (32064, 32000), "exact",
     "teacher_id_merges: {32000: 2} merges teacher ids past the student's vocabulary, but "
     "vocab_alignment is 'exact' with 32064 teacher ids and 32000 student ids; accepted: "
     "vocab_alignment truncate_teacher and a larger teacher"),
    ({5: 2}, (32064, 32000), "truncate_teacher",
     "teacher_id_merges.5: not past the student's 32000 ids within the teacher's 32064; "
     "accepted: teacher ids from 32000 to 32063 (an id the student has keeps its own "
     "probability)"),
    ({32064: 2}, (32064, 32000), "truncate_teacher",
     "teacher_id_merges.32064: not past the student's 32000 ids within the teacher's 32064; "
     "accepted: teacher ids from 32000 to 32063 (an id the student has keeps its own "
     "probability)"),
    ({32000: 32000}, (32064, 32000), "truncate_teacher",
     "teacher_id_merges.32000: 32000; accepted: a student id from 0 to 31999"),
    ({32000: "2"}, (32064, 32000), "truncate_teacher",
     "teacher_id_merges.32000: '2'; accepted: a student id from 0 to 31999"),
    ({"eos": 2}, (32064, 32000), "truncate_teacher",
     "teacher_id_merges: 'eos' is not a teacher id; accepted: integer ids from 32000 to 32063"),
    ([32000, 2], (32064, 32000), "truncate_teacher",
     "teacher_id_merges: must be a mapping {teacher_id: student_id}, got [32000, 2]"),
    ({32000: 2, " 32000": 2}, (32064, 32000), "truncate_teacher",  # its mass would count twice
     "teacher_id_merges.32000: listed twice ([32000, ' 32000']); accepted: each teacher id once"),
])
def test_teacher_id_merges_mistakes_are_one_line(value, sizes, alignment, message):
    from tad_torchtune.vocab import check_teacher_id_merges

    with pytest.raises(ValueError) as err:
        check_teacher_id_merges(value, teacher_vocab_size=sizes[0], student_vocab_size=sizes[1],
                                vocab_alignment=alignment)
    assert str(err.value) == message


def test_teacher_id_merges_read_from_a_config():
    """Integer keys, and the string keys a JSON file or some CLIs give; empty or null: none."""
    from tad_torchtune.vocab import IdMerges, check_teacher_id_merges

    sizes = dict(teacher_vocab_size=32064, student_vocab_size=32000,
                 vocab_alignment="truncate_teacher")
    want = IdMerges(sources=(32000, 32007), targets=(2, 2))
    assert check_teacher_id_merges({32000: 2, 32007: 2}, **sizes) == want
    assert check_teacher_id_merges({"32000": 2, " 32007": 2}, **sizes) == want
    assert check_teacher_id_merges(None, **sizes) is None
    assert check_teacher_id_merges({}, **sizes) is None


def test_a_merged_end_of_text_is_not_warned_about():
    from tad_torchtune.vocab import IdMerges, tokenizer_warnings

    (eos,) = tokenizer_warnings(_Splitter(32000), _Splitter(2), 32000, "truncate_teacher")
    assert eos.endswith("teacher_id_merges '{32000: 2}' adds it to the student's end-of-text")
    merged = IdMerges(sources=(32000,), targets=(2,))
    assert tokenizer_warnings(_Splitter(32000), _Splitter(2), 32000, "truncate_teacher",
                              merged) == []
    other = IdMerges(sources=(32007,), targets=(2,))
    assert len(tokenizer_warnings(_Splitter(32000), _Splitter(2), 32000, "truncate_teacher",
                                  other)) == 1
    elsewhere = IdMerges(sources=(32000,), targets=(5,))
    assert tokenizer_warnings(_Splitter(32000), _Splitter(2), 32000, "truncate_teacher",
                              elsewhere) == [
        "teacher_id_merges: the teacher's end-of-text 32000 is merged into id 5, not the "
        "student's end-of-text 2"]
