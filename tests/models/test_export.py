"""Hugging Face export of students (``models/_export.py``).

The teacher is written as a Hub-style checkpoint and loaded through torchtune's
``FullModelHFCheckpointer`` (the recipe's path); the student is exported, loaded with
``transformers.AutoModelForCausalLM`` and compared logit by logit with the torchtune student.
"""

import json

import pytest
import torch
from torchtune.config._utils import _get_component_from_path

from tad_torchtune.models import (
    init_student_from_teacher,
    load_hf_checkpoint,
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
    """A student exported as the recipe does (``copy_files_from`` = the teacher's folder) from
    the bundled demo teacher opens with ``AutoModelForCausalLM`` and ``AutoTokenizer`` from its
    folder alone, with the teacher's tokenizer and the torchtune student's logits."""
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
    save_hf_checkpoint(student, tmp_path / "export", base_config=teacher_dir,
                       copy_files_from=teacher_dir)
    alone = shutil.move(tmp_path / "export", tmp_path / "elsewhere" / "student")  # nothing beside it

    text = "A kludge: the wizard's ‘hack’ frobbed the daemon."
    ids = AutoTokenizer.from_pretrained(alone)(text)["input_ids"]
    assert ids == demo_tokenizer().encode(text, add_bos=False, add_eos=False)
    tokens = torch.tensor([[0, *ids]])  # BOS first, as in training
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
                       copy_files_from=[bare, tokenizer_dir])
    assert sorted(p.name for p in (tmp_path / "second").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert ((tmp_path / "second" / "tokenizer_config.json").read_text()
            == (tokenizer_dir / "tokenizer_config.json").read_text())
    assert AutoTokenizer.from_pretrained(tmp_path / "second")(text)["input_ids"] == ids
