"""Hugging Face export of students, and Gemma2 against transformers' implementation.

The teacher is written as a Hub-style checkpoint and loaded through torchtune's
``FullModelHFCheckpointer`` (the recipe's path); the student is exported, loaded with
``transformers.AutoModelForCausalLM`` and compared logit by logit with the torchtune student.
"""

import json

import pytest
import torch
from torchtune.config._utils import _get_component_from_path
from torchtune.models.gemma2 import gemma2
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM

from tad_torchtune.models import (
    correct_gemma2,
    forward_hidden,
    init_student_from_teacher,
    load_hf_checkpoint,
    project_logits,
    pruned_student,
    save_hf_checkpoint,
)
from tests.models.tiny import (
    CASES,
    SEQ,
    VOCAB,
    build_teacher,
    hf_config,
    load_with_checkpointer,
    randomize_,
    save_teacher_hf,
    teacher_node,
)

ATOL = 1e-4  # fp32


def _logits(model, tokens):
    with torch.no_grad():
        return project_logits(model, forward_hidden(model, tokens)[0]).float()


def _hf_logits(folder, tokens):
    hf = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        return hf.eval()(tokens).logits.float()


def _teacher_via_checkpointer(case, tmp_path):
    """A teacher saved as on the Hub, reloaded into a fresh torchtune model as the recipe does."""
    folder = save_teacher_hf(case, build_teacher(case), tmp_path / "teacher")
    node = teacher_node(case)
    teacher = correct_gemma2(_get_component_from_path(node.pop("_component_"))(**node))
    teacher.load_state_dict(load_with_checkpointer(case, folder, tmp_path / "teacher_out"))
    return teacher, folder


@pytest.mark.parametrize("case", list(CASES))
def test_exported_student_matches_transformers(case, tmp_path):
    teacher, teacher_dir = _teacher_via_checkpointer(case, tmp_path)
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
    ours, theirs = _logits(student, tokens), _hf_logits(out, tokens)
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


def test_export_narrow_student_and_fsdp_style_state_dict(tmp_path):
    """A narrower Qwen student (head_dim 8 -> 4), saved from a plain gathered state dict in bf16."""
    case = "qwen2"
    teacher, teacher_dir = _teacher_via_checkpointer(case, tmp_path)
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
    ours = _logits(student, tokens)
    torch.testing.assert_close(_hf_logits(fp32, tokens), ours, atol=ATOL, rtol=0)


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


# --------------------------------------------------------------------------------------------
# Gemma2: transformers is the reference.


def _tiny_hf_gemma2(tmp_path):
    cfg = hf_config("gemma2")
    hf = Gemma2ForCausalLM(Gemma2Config(**cfg)).eval()
    randomize_(hf, seed=5, norm_center=0.0)
    hf.save_pretrained(tmp_path / "hf_gemma2")
    return hf, tmp_path / "hf_gemma2"


def test_corrected_gemma2_matches_transformers(tmp_path):
    hf, folder = _tiny_hf_gemma2(tmp_path)
    node = teacher_node("gemma2")
    node.pop("_component_")
    tune_sd = load_with_checkpointer("gemma2", folder, tmp_path / "out")
    raw = gemma2(**node)
    raw.load_state_dict(tune_sd)
    fixed = correct_gemma2(gemma2(**node))
    fixed.load_state_dict(tune_sd)  # same keys before and after the correction

    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = hf(tokens).logits.float()
        forward_logits = fixed(tokens)
    torch.testing.assert_close(_logits(fixed, tokens), reference, atol=ATOL, rtol=0)
    torch.testing.assert_close(forward_logits, reference, atol=ATOL, rtol=0)
    # and the uncorrected torchtune model really is different
    assert (_logits(raw, tokens) - reference).abs().max() > 0.1


def test_correct_gemma2_is_idempotent_and_a_no_op_elsewhere():
    node = teacher_node("gemma2")
    node.pop("_component_")
    model = randomize_(gemma2(**node), seed=0, norm_center=0.0)
    keys = list(model.state_dict())
    tokens = torch.randint(0, VOCAB, (1, SEQ))
    once = _logits(correct_gemma2(model), tokens)
    twice = _logits(correct_gemma2(model), tokens)
    assert torch.equal(once, twice) and list(model.state_dict()) == keys
    assert model.logit_softcap == 30.0
    assert all(layer.attn.softcapping == 50.0 for layer in model.layers)

    llama = build_teacher("llama3")
    ref = _logits(llama, tokens)
    assert correct_gemma2(llama) is llama and not hasattr(llama, "logit_softcap")
    assert torch.equal(_logits(llama, tokens), ref)


def test_gemma2_student_is_corrected_and_matches_transformers(tmp_path):
    hf, folder = _tiny_hf_gemma2(tmp_path)
    node = teacher_node("gemma2")
    teacher = correct_gemma2(gemma2(**{k: v for k, v in node.items() if k != "_component_"}))
    teacher.load_state_dict(load_with_checkpointer("gemma2", folder, tmp_path / "out"))
    student = pruned_student(teacher=node, num_layers=3, intermediate_dim=24, head_dim=8,
                             num_heads=2, num_kv_heads=1)
    assert student.logit_softcap == 30.0
    init_student_from_teacher(student, teacher)
    out = save_hf_checkpoint(student, tmp_path / "student", base_config=folder)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["head_dim"] == 8 and cfg["query_pre_attn_scalar"] == 8
    assert cfg["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    torch.testing.assert_close(_hf_logits(out, tokens), _logits(student, tokens), atol=ATOL, rtol=0)


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


def test_correct_gemma2_through_activation_checkpointing_and_refusing_fsdp_like_classes():
    from torchtune.modules import TransformerSelfAttentionLayer
    from torchtune.training import set_activation_checkpointing

    node = teacher_node("gemma2")
    node.pop("_component_")
    reference = randomize_(gemma2(**node), seed=4, norm_center=0.0)
    wrapped = gemma2(**node)
    wrapped.load_state_dict(reference.state_dict())
    set_activation_checkpointing(wrapped, auto_wrap_policy={TransformerSelfAttentionLayer})
    correct_gemma2(wrapped)
    correct_gemma2(reference)
    tokens = torch.randint(0, VOCAB, (1, SEQ))
    assert torch.equal(_logits(wrapped, tokens), _logits(reference, tokens))

    class ShardedLayer(TransformerSelfAttentionLayer):  # stands in for FSDP2's dynamic subclass
        pass

    other = gemma2(**node)
    other.layers[0].__class__ = ShardedLayer
    with pytest.raises(ValueError, match="before FSDP"):
        correct_gemma2(other)


def test_register_family_is_all_a_new_family_needs(tmp_path):
    """The documented extension step: torchtune's Gemma (v1) is not built in; one
    ``register_family`` call makes students, initialisation and export work for it."""
    from torchtune.models.gemma import gemma

    from tad_torchtune.models import FAMILIES, ModelFamily, register_family

    kwargs = dict(vocab_size=VOCAB, num_layers=4, num_heads=4, head_dim=16, num_kv_heads=1,
                  embed_dim=32, intermediate_dim=48, max_seq_len=64)
    node = {"_component_": "torchtune.models.gemma.gemma", **kwargs}
    with pytest.raises(ValueError, match="register_family"):
        pruned_student(teacher=node, num_layers=2)
    register_family(ModelFamily("gemma", "torchtune.models.gemma.gemma", "GEMMA", "gemma"))
    try:
        teacher = randomize_(gemma(**kwargs), seed=0, norm_center=0.0)
        student = pruned_student(teacher=node, num_layers=2, intermediate_dim=24)
        init_student_from_teacher(student, teacher)
        assert torch.equal(student.layers[1].attn.q_proj.weight,
                           teacher.layers[3].attn.q_proj.weight)
        base = dict(model_type="gemma", architectures=["GemmaForCausalLM"], vocab_size=VOCAB,
                    hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=1, head_dim=16, intermediate_size=48, rms_norm_eps=1e-6,
                    rope_theta=10000.0, hidden_activation="gelu_pytorch_tanh",
                    tie_word_embeddings=True, max_position_embeddings=64, pad_token_id=0)
        out = save_hf_checkpoint(student, tmp_path / "gemma", base_config=base)
        tokens = torch.randint(0, VOCAB, (2, SEQ))
        ours = _logits(student, tokens)
        torch.testing.assert_close(_hf_logits(out, tokens), ours, atol=ATOL, rtol=0)
    finally:
        FAMILIES.pop("gemma")


@pytest.mark.parametrize("case", sorted(CASES))
def test_tad_eval_builds_every_family_from_config_json_alone(case, tmp_path):
    """An exported student of every family is rebuilt by ``tad_eval`` from its folder alone
    (the family read from config.json, its conversion loading the weights), with the
    student's exact logits."""
    from tad_torchtune.models import load_hf_folder

    teacher, teacher_dir = _teacher_via_checkpointer(case, tmp_path)
    torch.manual_seed(0)
    student = pruned_student(teacher=teacher_node(case), num_layers=2, intermediate_dim=24,
                             mlp_init="copy")
    init_student_from_teacher(student, teacher)
    out = save_hf_checkpoint(student, tmp_path / "student", base_config=teacher_dir)
    model = load_hf_folder(out, where="students.s", device=torch.device("cpu"),
                           dtype=torch.float32)
    assert type(model.layers[0]) is type(student.layers[0])
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    ours, rebuilt = _logits(student, tokens), _logits(model, tokens)
    assert ours.abs().max() > 1.0
    torch.testing.assert_close(rebuilt, ours, atol=1e-6, rtol=0)


def test_model_from_hf_config_names_what_no_family_can_build():
    from tad_torchtune.models import model_from_hf_config

    cfg = hf_config("llama3_1")
    cfg["rope_scaling"] = dict(cfg["rope_scaling"], high_freq_factor=2.0)
    with pytest.raises(ValueError, match=r"students.x: no registered model family builds "
                                         r"model_type='llama' \(llama2: no RoPE scaling"):
        model_from_hf_config(cfg, where="students.x")
    with pytest.raises(ValueError, match=r"model_type='gpt2' \(registered model types: "):
        model_from_hf_config({"model_type": "gpt2"}, where="students.x")


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
    torch.testing.assert_close(_hf_logits(alone, tokens), _logits(student, tokens), atol=ATOL, rtol=0)

    # a teacher folder without a tokenizer gives an export that cannot be self-contained: said
    bare = tmp_path / "bare_teacher"
    bare.mkdir()
    shutil.copyfile(Path(teacher_dir) / "config.json", bare / "config.json")
    with pytest.warns(UserWarning, match=r"bare_teacher' holds none of \('tokenizer.json', "
                                         r"'tokenizer.model', 'vocab.json'\), so .* will not open"):
        save_hf_checkpoint(student, tmp_path / "bare", base_config=bare, copy_files_from=bare)
