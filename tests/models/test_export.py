"""Hugging Face export of students (``models/_export.py``).

The teacher is written as a Hub-style checkpoint and loaded through torchtune's
``FullModelHFCheckpointer`` (the recipe's path); the student is exported, loaded with
``transformers.AutoModelForCausalLM`` and compared logit by logit with the torchtune student.
"""

import json
import warnings

import pytest
import torch
from torchtune.config._utils import _get_component_from_path

from tad_torchtune.models import (
    init_student_from_teacher,
    load_hf_checkpoint,
    prepended_bos_id,
    pruned_student,
    save_hf_checkpoint,
)
from tests.helpers.teachers import (
    ATOL,
    CASES,
    SEQ,
    VOCAB,
    build_teacher,
    hf_config,
    hf_logits,
    load_with_checkpointer,
    logits_of,
    teacher_node,
    teacher_via_checkpointer,
)


@pytest.mark.parametrize("case", list(CASES))
def test_exported_student_matches_transformers(case, tmp_path):
    teacher, teacher_dir = teacher_via_checkpointer(case, tmp_path)
    torch.manual_seed(0)
    student = pruned_student(teacher=teacher_node(case), num_layers=2, intermediate_dim=24,
                             mlp_init="copy")
    init_student_from_teacher(student, teacher)
    before = {k: v.clone() for k, v in student.state_dict().items()}

    out = save_hf_checkpoint(student, tmp_path / "student", base_config=teacher_dir)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["hidden_size"]) == (2, 24, 32)
    assert cfg["tie_word_embeddings"] == hf_config(case)["tie_word_embeddings"]
    assert cfg["model_type"] == hf_config(case)["model_type"]
    assert "_name_or_path" not in cfg

    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    ours, theirs = logits_of(student, tokens), hf_logits(out, tokens)
    assert ours.abs().max() > 1.0  # the comparison is not between near-zero logits
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    # exporting never touched the live weights
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k]), k

    # torchtune's checkpointer reads the export back into an identical student
    again = pruned_student(teacher=teacher_node(case), num_layers=2, intermediate_dim=24)
    again.load_state_dict(load_with_checkpointer(case, out, tmp_path / "reload_out"))
    for k, v in again.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("family", ["mistral", "phi3"])
def test_a_students_export_carries_the_window_it_was_trained_with(family, tmp_path):
    """A pruned student of a Phi-3 or Mistral teacher whose config.json has a sliding window,
    loaded as the recipe loads it (``load_student``: built with the teacher's folder), attends
    within that window; its export says so (``sliding_window``), and transformers computes the
    student's logits from it on rows longer than the window. A model built without a
    config.json attends over the whole row, and its export says null (a Mistral config.json
    without the key would mean transformers' 4096)."""
    from omegaconf import OmegaConf

    from tad_torchtune.models import hf_config_for
    from tad_torchtune.models.loading import checkpoint_state, load_student
    from tests.helpers.teachers import (
        WINDOWED,
        save_hf_windowed,
        windowed_checkpointer,
        windowed_node,
    )

    window, length = 6, 28
    teacher_dir = save_hf_windowed(tmp_path / "teacher", family, window=window)
    teacher = windowed_node(family)
    ckpt = OmegaConf.create(windowed_checkpointer(family, teacher_dir, tmp_path / "tune_out"))
    node = OmegaConf.create({"_component_": "tad_torchtune.models.pruned_student",
                             "teacher": teacher, "num_layers": 1, "mlp_init": "copy"})
    student, hf_dir, model_type = load_student(
        node, teacher_state=checkpoint_state(ckpt, "teacher_checkpointer"),
        teacher_checkpointer=ckpt, student_checkpointer=None, device=torch.device("cpu"),
        dtype=torch.float32, seed=0)
    out = save_hf_checkpoint(student, tmp_path / "student", base_config=hf_dir,
                             model_type=model_type)
    assert json.loads((out / "config.json").read_text())["sliding_window"] == window
    tokens = torch.randint(0, WINDOWED["vocab_size"], (2, length),
                           generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(hf_logits(out, tokens), logits_of(student, tokens), atol=ATOL,
                               rtol=0)

    plain = pruned_student(teacher=teacher, num_layers=1)
    assert hf_config_for(plain, json.loads((out / "config.json").read_text()))[
        "sliding_window"] is None


def test_export_narrow_student_and_fsdp_style_state_dict(tmp_path):
    """A narrower Qwen student (head_dim 8 -> 4), saved from a plain gathered state dict in bf16."""
    case = "qwen2"
    teacher, teacher_dir = teacher_via_checkpointer(case, tmp_path)
    student = pruned_student(teacher=teacher_node(case), num_layers=3, embed_dim=16,
                             num_heads=4, num_kv_heads=2, intermediate_dim=24)
    init_student_from_teacher(student, teacher)
    gathered = {k: v.detach().clone() for k, v in student.state_dict().items()}
    out = save_hf_checkpoint(student, tmp_path / "bf16", base_config=json.loads(
        (teacher_dir / "config.json").read_text()), state_dict=gathered, dtype="bf16",
        model_type="qwen2")
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]) == (16, 4, 3)
    assert cfg["torch_dtype"] == "bfloat16" and "layer_types" not in cfg
    assert all(v.dtype == torch.float32 for v in gathered.values())  # the source was not cast

    reloaded = pruned_student(teacher=teacher_node(case), num_layers=3, embed_dim=16,
                              num_heads=4, num_kv_heads=2, intermediate_dim=24)
    load_hf_checkpoint(reloaded, out)
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, gathered[k].to(torch.bfloat16).float()), k

    tokens = torch.randint(0, VOCAB, (2, SEQ))
    fp32 = save_hf_checkpoint(student, tmp_path / "fp32", base_config=teacher_dir)
    ours = logits_of(student, tokens)
    torch.testing.assert_close(hf_logits(fp32, tokens), ours, atol=ATOL, rtol=0)


def test_export_refuses_wrong_family_and_uncorrected_gemma2(tmp_path):
    student = pruned_student(teacher=teacher_node("qwen2"), num_layers=1)
    with pytest.raises(ValueError, match="does not match the student's family"):
        save_hf_checkpoint(student, tmp_path / "x", base_config=hf_config("gemma2"))
    with pytest.raises(ValueError, match="dtype"):
        save_hf_checkpoint(student, tmp_path / "x", base_config=hf_config("qwen2"), dtype="int3")
    node = teacher_node("gemma2")
    raw = _get_component_from_path(node.pop("_component_"))(**node)
    with pytest.raises(ValueError, match="correct_gemma2"):
        save_hf_checkpoint(raw, tmp_path / "y", base_config=hf_config("gemma2"),
                           model_type="GEMMA2")
    with pytest.raises(ValueError, match="model_type is required"):
        save_hf_checkpoint(raw, tmp_path / "y", base_config=hf_config("gemma2"))


def test_export_after_activation_checkpointing_wrappers(tmp_path):
    """The recipe exports the training model, whose layers are wrapped: the files must be those
    of the unwrapped model, also from a state dict keyed by wrapped parameter names."""
    from safetensors.torch import load_file
    from torchtune.modules import TransformerSelfAttentionLayer
    from torchtune.training import set_activation_checkpointing

    teacher = build_teacher("gemma2")
    student = pruned_student(teacher=teacher_node("gemma2"), num_layers=2, intermediate_dim=24)
    init_student_from_teacher(student, teacher)
    plain = save_hf_checkpoint(student, tmp_path / "plain", base_config=hf_config("gemma2"))
    set_activation_checkpointing(student, auto_wrap_policy={TransformerSelfAttentionLayer})
    named = dict(student.named_parameters())
    assert any("_checkpoint_wrapped_module" in k for k in named)
    wrapped = save_hf_checkpoint(student, tmp_path / "wrapped", base_config=hf_config("gemma2"),
                                 state_dict=named)
    assert (plain / "config.json").read_text() == (wrapped / "config.json").read_text()
    a = load_file(str(plain / "model.safetensors"))
    b = load_file(str(wrapped / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_exported_demo_student_is_self_contained(tmp_path):
    """A student exported as the recipe does (``copy_files_from`` = the teacher's folder,
    ``add_bos_id`` from the training tokenizer) from the bundled demo teacher opens with
    ``AutoModelForCausalLM`` and ``AutoTokenizer`` from its folder alone, with the torchtune
    student's logits and the ids of training's tokenizer: the demo tokenizer.json adds no BOS,
    torchtune's HuggingFaceBaseTokenizer prepends it, and so does the export's."""
    import shutil
    from pathlib import Path

    from transformers import AutoTokenizer

    from tad_torchtune.data import resolve_asset
    from tad_torchtune.demo import bundled_config, demo_tokenizer

    teacher_dir = resolve_asset("pkg://demo/teacher")
    node = dict(bundled_config("demo")["teacher_model"])
    teacher = _get_component_from_path(node.pop("_component_"))(**node)
    teacher.load_state_dict(load_with_checkpointer("llama3", teacher_dir, tmp_path / "ckpt"))
    torch.manual_seed(0)
    student = pruned_student(teacher=bundled_config("demo")["teacher_model"], num_layers=2,
                             intermediate_dim=256, mlp_init="fresh")
    init_student_from_teacher(student, teacher)
    trained_with = demo_tokenizer()
    bos = trained_with.bos_id
    assert prepended_bos_id(trained_with) == bos == 0
    save_hf_checkpoint(student, tmp_path / "export", base_config=teacher_dir,
                       copy_files_from=teacher_dir, add_bos_id=bos)
    alone = shutil.move(tmp_path / "export", tmp_path / "elsewhere" / "student")  # nothing beside it

    hf_tok = AutoTokenizer.from_pretrained(alone)
    assert hf_tok("hello world")["input_ids"] == [0, 331, 676, 81, 1440]  # recorded
    texts = ["A kludge: the wizard's ‘hack’ frobbed the daemon.", "hello world", " x", "",
             "<|end_of_text|> after", "naïve café\n\tdone"]
    for text in texts:
        assert hf_tok(text)["input_ids"] == trained_with.encode(text, add_eos=False), text
    # a pair as transformers' own templates give it: BOS before each text
    first, second = (trained_with.encode(t, add_eos=False) for t in texts[:2])
    assert hf_tok(texts[0], texts[1])["input_ids"] == first + second
    assert hf_tok.decode(hf_tok(texts[0])["input_ids"], skip_special_tokens=True) == texts[0]
    # only the post-processor changed (the demo's has none)
    source = json.loads((Path(teacher_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    exported = json.loads((Path(alone) / "tokenizer.json").read_text(encoding="utf-8"))
    assert source.pop("post_processor") is None and exported.pop("post_processor") is not None
    assert exported == source
    ids = hf_tok(texts[0])["input_ids"]
    tokens = torch.tensor([ids])
    torch.testing.assert_close(hf_logits(alone, tokens), logits_of(student, tokens), atol=ATOL, rtol=0)

    # a teacher folder without a tokenizer gives an export that cannot be self-contained: said
    bare = tmp_path / "bare_teacher"
    bare.mkdir()
    shutil.copyfile(Path(teacher_dir) / "config.json", bare / "config.json")
    with pytest.warns(UserWarning, match=r"bare_teacher' holds none of \('tokenizer.json', "
                                         r"'tokenizer.model', 'vocab.json'\), so .* will not open"):
        save_hf_checkpoint(student, tmp_path / "bare", base_config=bare, copy_files_from=bare)
    # with the folder of the tokenizer the data was encoded with after it (the recipe's): the
    # files of that folder alone, which open as that tokenizer
    tokenizer_dir = tmp_path / "tokenizer_dir"
    tokenizer_dir.mkdir()
    shutil.copyfile(Path(teacher_dir) / "tokenizer.json", tokenizer_dir / "tokenizer.json")
    shutil.copyfile(Path(teacher_dir) / "generation_config.json",
                    tokenizer_dir / "tokenizer_config.json")  # not a tokenizer's: must not be
    (bare / "tokenizer_config.json").write_text("{}")  # the bare folder's is not copied either
    save_hf_checkpoint(student, tmp_path / "second", base_config=bare,
                       copy_files_from=[bare, tokenizer_dir], add_bos_id=bos)
    assert sorted(p.name for p in (tmp_path / "second").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert ((tmp_path / "second" / "tokenizer_config.json").read_text()
            == (tokenizer_dir / "tokenizer_config.json").read_text())
    assert AutoTokenizer.from_pretrained(tmp_path / "second")(texts[0])["input_ids"] == ids


def _byte_level_bpe(folder, specials, *, post_processor=None):
    """A tiny byte-level BPE (GPT-2's kind) as tokenizer.json, vocab.json and merges.txt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog."] * 20,
        trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = post_processor
    tok.save(str(folder / "tokenizer.json"))
    tok.model.save(str(folder))
    return tok


def _tiny_student():
    return pruned_student(teacher=teacher_node("llama3"), num_layers=1, intermediate_dim=24)


TEXTS = ["def f(x):\n    return x", "The lazy fox.", " a", "<|endoftext|> after"]


def test_export_of_a_phi2_like_tokenizer_prepends_its_bos_after_its_byte_level_step(tmp_path):
    """Phi-2's tokenizer.json (CodeGen's) has a ByteLevel post-processor and no BOS, which
    torchtune's HuggingFaceBaseTokenizer prepends (``<|endoftext|>``): the export keeps the
    ByteLevel step (offsets without the leading space) and adds the BOS after it."""
    from tokenizers import processors
    from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer
    from transformers import AutoTokenizer

    src = tmp_path / "phi2"
    _byte_level_bpe(src, ["<|endoftext|>"], post_processor=processors.ByteLevel(trim_offsets=True))
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "add_bos_token": False,
         "tokenizer_class": "CodeGenTokenizer"}))
    trained_with = HuggingFaceBaseTokenizer(
        str(src / "tokenizer.json"), tokenizer_config_json_path=str(src / "tokenizer_config.json"))
    assert not trained_with.hf_adds_bos and prepended_bos_id(trained_with) == 0
    out = save_hf_checkpoint(_tiny_student(), tmp_path / "export", base_config=hf_config("llama3"),
                             copy_files_from=src, add_bos_id=prepended_bos_id(trained_with))
    hf_tok = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == trained_with.encode(text, add_eos=False), text
    source = json.loads((src / "tokenizer.json").read_text())
    processor = json.loads((out / "tokenizer.json").read_text())["post_processor"]
    assert processor["type"] == "Sequence"
    assert processor["processors"][0] == source["post_processor"]
    # the ByteLevel step still trims the space before "dog" from its offsets
    offsets = hf_tok(" lazy dog", return_offsets_mapping=True)["offset_mapping"]
    assert offsets[1:] == AutoTokenizer.from_pretrained(src)(
        " lazy dog", return_offsets_mapping=True)["offset_mapping"]
    assert offsets[-1] == (6, 9)
    # tokenizer_config.json is copied as it is: with a tokenizer.json, transformers 5 ignores its
    # add_bos_token, and `true` would make transformers 4's CodeGen fast tokenizer raise
    name = "tokenizer_config.json"
    assert (out / name).read_bytes() == (src / name).read_bytes()


def _qwen2_like(folder):
    from torchtune.models.qwen2 import qwen2_tokenizer

    _byte_level_bpe(folder, ["<|endoftext|>"])
    return qwen2_tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def _adding_bos_itself(folder):
    from tests.helpers.toy_tokenizers import hf_tokenizer

    return hf_tokenizer(folder, template=True)  # "<s> $A </s>": HF adds BOS (and EOS) itself


@pytest.mark.parametrize("kind", [_qwen2_like, _adding_bos_itself])
def test_export_copies_tokenizers_that_already_agree_unchanged(kind, tmp_path):
    """No BOS on either side (Qwen2's tokenizer), or a tokenizer.json that adds it itself (Llama's
    and Gemma's post-processors): the export's tokenizer files are the source's, byte for byte,
    and AutoTokenizer gives training's ids."""
    from transformers import AutoTokenizer

    src = tmp_path / "source"
    trained_with = kind(src)
    bos = prepended_bos_id(trained_with)
    assert bos == (None if kind is _qwen2_like else trained_with.bos_id)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say either
        out = save_hf_checkpoint(_tiny_student(), tmp_path / "export",
                                 base_config=hf_config("llama3"), copy_files_from=src,
                                 add_bos_id=bos)
    copied = sorted(p.name for p in out.iterdir()
                    if p.name not in ("config.json", "model.safetensors"))
    assert copied == sorted(p.name for p in src.iterdir())
    for name in copied:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    if kind is _adding_bos_itself:  # Qwen2's torchtune tokenizer splits text its own way
        hf_tok = AutoTokenizer.from_pretrained(out)
        for text in TEXTS:
            assert hf_tok(text)["input_ids"] == trained_with.encode(text, add_eos=False), text


def test_export_says_when_it_cannot_make_the_tokenizer_prepend_the_bos(tmp_path):
    """A vocabulary without tokenizer.json (vocab.json + merges.txt), or a tokenizer.json that
    adds another special token: one warning line, the files copied as they are."""
    from tokenizers import processors

    slow = tmp_path / "slow"
    _byte_level_bpe(slow, ["<|endoftext|>"])
    (slow / "tokenizer.json").unlink()
    with pytest.warns(UserWarning, match=r"put the BOS id 0 before every document and "
                                         r"'.*slow_export' has no tokenizer.json in which"):
        save_hf_checkpoint(_tiny_student(), tmp_path / "slow_export",
                           base_config=hf_config("llama3"), copy_files_from=slow, add_bos_id=0)
    other = tmp_path / "other"
    _byte_level_bpe(other, ["<s>", "</s>"], post_processor=processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]))
    with pytest.warns(UserWarning, match=r"has a tokenizer.json that adds \[1\] instead"):
        out = save_hf_checkpoint(_tiny_student(), tmp_path / "other_export",
                                 base_config=hf_config("llama3"), copy_files_from=other,
                                 add_bos_id=0)
    assert (out / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()
