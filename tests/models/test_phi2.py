"""Phi-2 against transformers' ``PhiForCausalLM``: the teacher read from a folder that
transformers wrote, and a pruned student exported and read back by transformers.

The Hugging Face model is a Phi-2 in miniature with Phi-2's own ``partial_rotary_factor`` 0.4:
heads of 16 rotate ``int(0.4 * 16) = 6`` dimensions, so both the partial rotation and the
rounding down are exercised; every bias and LayerNorm parameter is random (none 0, none 1).
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, PhiConfig, PhiForCausalLM

from tad_torchtune.errors import ConfigError, instantiate
from tad_torchtune.models import (
    FAMILIES,
    HFCheckpointer,
    forward_hidden,
    init_student_from_teacher,
    load_hf_checkpoint,
    model_from_hf_config,
    output_bias,
    output_weight,
    phi2,
    project_logits,
    pruned_student,
    save_hf_checkpoint,
)
from tests.helpers.teachers import load_with_checkpointer, randomize_, save_teacher_hf

ATOL = 1e-4  # fp32
VOCAB, SEQ = 96, 20
HF_CONFIG = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.4, rope_theta=10000.0,
    layer_norm_eps=1e-5, hidden_act="gelu_new", qk_layernorm=False, max_position_embeddings=64,
    tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
    bos_token_id=1, eos_token_id=2,
)


@pytest.fixture(scope="module")
def hf_phi(tmp_path_factory):
    """``(transformers model, its save_pretrained folder)``."""
    folder = tmp_path_factory.mktemp("phi") / "hf"
    model = randomize_(PhiForCausalLM(PhiConfig(**HF_CONFIG)), seed=7).eval()
    model.save_pretrained(folder)
    return model, folder


def _tokens(seed=1, rows=2):
    return torch.randint(0, VOCAB, (rows, SEQ), generator=torch.Generator().manual_seed(seed))


def _logits(model, tokens):
    with torch.no_grad():
        return project_logits(model, forward_hidden(model, tokens)[0]).float()


def _hf_logits(model_or_folder, tokens):
    model = model_or_folder
    if not isinstance(model, torch.nn.Module):
        model = AutoModelForCausalLM.from_pretrained(model_or_folder, dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def _teacher(folder):
    cfg = json.loads((folder / "config.json").read_text())
    model, family = model_from_hf_config(cfg)
    load_hf_checkpoint(model, folder, model_type=family.checkpointer_model_type)
    node = {"_component_": family.component, **family.kwargs_from_hf_config(cfg)}
    return model.eval(), node


def test_parameters_are_neither_zero_nor_one(hf_phi):
    hf, _ = hf_phi
    for name, p in hf.named_parameters():
        assert (p != 0).all() and (p != 1).all(), name
    assert hf.lm_head.bias is not None and hf.model.layers[0].self_attn.rotary_ndims == 6


def test_phi2_read_from_transformers_folder_matches_transformers(hf_phi):
    hf, folder = hf_phi
    model, family = model_from_hf_config(json.loads((folder / "config.json").read_text()))
    assert family.name == "phi2"
    assert model.layers[0].attn.pos_embeddings.rotary_dim == 6
    load_hf_checkpoint(model, folder, model_type="PHI2")
    tokens = _tokens()
    reference = _hf_logits(hf, tokens)
    ours = _logits(model, tokens)
    assert reference.abs().max() > 1.0
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)
    with torch.no_grad():  # torchtune's own forward agrees (float32 logits, bias included)
        torch.testing.assert_close(model(tokens), reference, atol=ATOL, rtol=0)
    assert torch.equal(output_bias(model), hf.lm_head.bias)
    assert torch.equal(output_weight(model), hf.lm_head.weight)

    # the test sees the partial rotation: rotating whole heads changes the logits
    whole = phi2(**{**family.kwargs_from_hf_config(json.loads((folder / "config.json")
                                                               .read_text())),
                    "partial_rotary_factor": 1.0})
    whole.load_state_dict(model.state_dict())
    assert (_logits(whole, tokens) - reference).abs().max() > 1e-2


def test_hf_keys_round_trip(hf_phi):
    hf, _ = hf_phi
    family = FAMILIES["phi2"]
    hf_sd = hf.state_dict()
    tune_sd = family.from_hf(hf_sd, HF_CONFIG)
    model = phi2(**family.kwargs_from_hf_config(HF_CONFIG))
    assert set(tune_sd) == set(model.state_dict())
    back = family.to_hf(tune_sd, HF_CONFIG)
    assert set(back) == set(hf_sd) and all(back[k] is hf_sd[k] for k in back)


def test_hf_checkpointer_reads_phi2_and_every_other_family(hf_phi, tmp_path):
    _, folder = hf_phi
    expected = _teacher(folder)[0].state_dict()
    for model_type in ("PHI2", None):  # named, or from config.json's model_type
        state = HFCheckpointer(checkpoint_dir=str(folder), checkpoint_files=["model.safetensors"],
                               model_type=model_type, output_dir=str(tmp_path)).load_checkpoint()
        assert state.keys() == {"model"} and state["model"].keys() == expected.keys()
        assert all(torch.equal(state["model"][k], expected[k]) for k in expected)

    # a .bin file, and torchtune's {filename_format, max_filename} form
    hf_sd = FAMILIES["phi2"].to_hf(expected, HF_CONFIG)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((folder / "config.json").read_text())
    torch.save(hf_sd, bin_dir / "pytorch_model-1-of-1.bin")
    state = HFCheckpointer(checkpoint_dir=str(bin_dir), checkpoint_files={
        "filename_format": "pytorch_model-{}-of-{}.bin", "max_filename": "1"}).load_checkpoint()
    assert all(torch.equal(state["model"][k], expected[k]) for k in expected)

    # another family: what torchtune's own checkpointer reads
    from tests.helpers.teachers import build_teacher

    qwen_dir = save_teacher_hf("qwen2", build_teacher("qwen2"), tmp_path / "qwen")
    theirs = load_with_checkpointer("qwen2", qwen_dir, tmp_path / "out")
    ours = HFCheckpointer(checkpoint_dir=str(qwen_dir), checkpoint_files=["model.safetensors"],
                          model_type=None).load_checkpoint()["model"]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("overrides,message", [
    (dict(model_type="QWEN2"), r"teacher_checkpointer.model_type: QWEN2 converts Hugging Face "
                               r"model_type 'qwen2', but .* says 'phi'"),
    (dict(model_type="GPT9"), r"teacher_checkpointer.model_type: 'GPT9' is not a registered "
                              r"family's; accepted: .*'PHI2'"),
    (dict(resume_from_checkpoint=True), r"teacher_checkpointer.resume_from_checkpoint: "
                                        r"HFCheckpointer reads model weights only"),
    (dict(checkpoint_dir="/nonexistent"), r"teacher_checkpointer.checkpoint_dir: '/nonexistent' "
                                          r"has no config.json"),
])
def test_hf_checkpointer_errors_name_the_key(hf_phi, overrides, message):
    _, folder = hf_phi
    node = {"_component_": "tad_torchtune.models.HFCheckpointer", "checkpoint_dir": str(folder),
            "checkpoint_files": ["model.safetensors"], "model_type": "PHI2",
            "output_dir": "/tmp/unused", **overrides}
    from omegaconf import OmegaConf

    with pytest.raises(ConfigError, match=message):
        instantiate(OmegaConf.create(node), "teacher_checkpointer")


@pytest.mark.parametrize("change,message", [
    (dict(qk_layernorm=True), "phi2: no qk_layernorm"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
     "phi2: no RoPE scaling"),
    (dict(hidden_act="gelu"), "phi2: the MLP is GELU with the tanh approximation"),
    (dict(tie_word_embeddings=True), "phi2: its builder's output projection is untied"),
])
def test_configs_phi2_cannot_express_are_refused(hf_phi, change, message):
    _, folder = hf_phi
    cfg = {**json.loads((folder / "config.json").read_text()), **change}
    with pytest.raises(ValueError, match=rf"model_type='phi' \({message}"):
        model_from_hf_config(cfg)


def test_identity_student_equals_its_teacher(hf_phi):
    """Every layer, full width, MLPs copied: every weight and bias is the teacher's."""
    hf, folder = hf_phi
    teacher, node = _teacher(folder)
    student = pruned_student(teacher=node, num_layers=3, mlp_init="copy")
    init_student_from_teacher(student, teacher)
    tokens = _tokens(seed=2)
    assert torch.equal(_logits(student, tokens), _logits(teacher, tokens))


# (student widths, the teacher head's dimensions each student head keeps, how many it rotates)
STUDENTS = {
    "shallow_fresh": (dict(mlp_init="fresh"), list(range(16)), 6),
    "shallow_copy": (dict(mlp_init="copy"), list(range(16)), 6),
    # heads 16 -> 12: rotated int(0.4 * 12) = 4 of the teacher's 6, pairs (i, i + 3): the pairs
    # (0, 3) and (1, 4); then the first 8 of its 10 unrotated dimensions
    "narrow": (dict(mlp_init="copy", embed_dim=48, num_heads=4, num_kv_heads=2),
               [0, 1, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13], 4),
}


@pytest.mark.parametrize("name", list(STUDENTS))
def test_pruned_student_exports_to_transformers(hf_phi, name, tmp_path):
    _, folder = hf_phi
    widths, dims, rotated = STUDENTS[name]
    teacher, node = _teacher(folder)
    torch.manual_seed(0)
    student = pruned_student(teacher=node, num_layers=2, intermediate_dim=24, **widths)
    init_student_from_teacher(student, teacher)
    assert student.distill_spec.teacher_layers == (0, 2)
    frozen = {k for k, p in student.named_parameters() if not p.requires_grad}
    assert frozen == {"tok_embeddings.weight", "output.weight", "output.bias"}

    s_dim, s_heads, s_kv, s_hd = student.distill_spec.student_width
    assert len(dims) == s_hd
    for s_i, t_i in enumerate((0, 2)):
        s_layer, t_layer = student.layers[s_i], teacher.layers[t_i]
        for proj, heads in (("q_proj", s_heads), ("k_proj", s_kv), ("v_proj", s_kv)):
            t_w, t_b = getattr(t_layer.attn, proj).weight, getattr(t_layer.attn, proj).bias
            rows = [h * 16 + d for h in range(heads) for d in dims]
            assert torch.equal(getattr(s_layer.attn, proj).weight, t_w[rows, :s_dim]), proj
            assert torch.equal(getattr(s_layer.attn, proj).bias, t_b[rows]), proj
        cols = [h * 16 + d for h in range(s_heads) for d in dims]
        assert torch.equal(s_layer.attn.output_proj.weight,
                           t_layer.attn.output_proj.weight[:s_dim, cols])
        assert torch.equal(s_layer.attn.output_proj.bias, t_layer.attn.output_proj.bias[:s_dim])
        for kind in ("weight", "bias"):  # the block's one LayerNorm
            assert torch.equal(getattr(s_layer.sa_norm, kind),
                               getattr(t_layer.sa_norm, kind)[:s_dim])
    assert torch.equal(student.norm.bias, teacher.norm.bias[:s_dim])
    assert torch.equal(output_bias(student), output_bias(teacher))
    assert torch.equal(output_weight(student), output_weight(teacher)[:, :s_dim])

    out = save_hf_checkpoint(student, tmp_path / "student", base_config=folder)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["intermediate_size"]) == ("phi", 2, 24)
    assert cfg["hidden_size"] == s_dim and cfg["rope_parameters"]["partial_rotary_factor"] == 0.4
    hf_student = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                      attn_implementation="eager").eval()
    assert isinstance(hf_student, PhiForCausalLM)
    assert hf_student.model.layers[0].self_attn.rotary_ndims == rotated
    assert student.layers[0].attn.pos_embeddings.rotary_dim == rotated
    tokens = _tokens(seed=3)
    ours, theirs = _logits(student, tokens), _hf_logits(hf_student, tokens)
    assert ours.abs().max() > 1.0
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)


def test_student_head_must_rotate_whole_pairs(hf_phi):
    _, folder = hf_phi
    _, node = _teacher(folder)
    # heads of 8: int(0.4 * 8) = 3 rotated dimensions, which no pair of a rotary embedding covers
    with pytest.raises(ValueError, match=r"head_dim must rotate an even number of dimensions "
                                         r"\(rotary pairs\), got 8 \(of which 3 rotated\)"):
        pruned_student(teacher=node, num_layers=1, embed_dim=32, num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match=r"rotates int\(0.4 \* 8\) = 3 dimensions"):
        phi2(vocab_size=8, num_layers=1, num_heads=4, num_kv_heads=4, embed_dim=32,
             intermediate_dim=8, max_seq_len=8)


# microsoft/phi-2's config.json in the layout the Hub serves (transformers 4.37: rope_theta and
# partial_rotary_factor at the top level, where transformers 5 writes rope_parameters)
HUB_PHI2 = dict(
    architectures=["PhiForCausalLM"], model_type="phi", attention_dropout=0.0,
    bos_token_id=50256, eos_token_id=50256, embd_pdrop=0.0, hidden_act="gelu_new",
    hidden_size=2560, initializer_range=0.02, intermediate_size=10240, layer_norm_eps=1e-05,
    max_position_embeddings=2048, num_attention_heads=32, num_hidden_layers=32,
    num_key_value_heads=32, partial_rotary_factor=0.4, qk_layernorm=False, resid_pdrop=0.1,
    rope_scaling=None, rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="float16",
    transformers_version="4.37.0", use_cache=True, vocab_size=51200,
)


def test_hub_phi2_config_builds_phi2_2_7b():
    from tad_torchtune.models import phi2_2_7b

    with torch.device("meta"):
        model, family = model_from_hf_config(HUB_PHI2)
        reference = phi2_2_7b()
        theirs = PhiForCausalLM(PhiConfig(**HUB_PHI2))
    assert family.name == "phi2"
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in reference.state_dict().items()}
    hf_sd = FAMILIES["phi2"].to_hf(model.state_dict(), HUB_PHI2)
    assert {k: v.shape for k, v in hf_sd.items()} == {k: v.shape for k, v in
                                                      theirs.state_dict().items()}
    # transformers reads the same rotation and epsilon from this layout
    assert theirs.model.layers[0].self_attn.rotary_ndims == 32
    assert model.layers[0].attn.pos_embeddings.rotary_dim == 32
    assert model.layers[0].sa_norm.eps == theirs.model.layers[0].input_layernorm.eps == 1e-5


def test_output_bias_is_none_for_every_other_family():
    from tests.helpers.teachers import CASES, build_teacher

    for case, (family, _, _) in CASES.items():
        bias = output_bias(build_teacher(case))
        assert (bias is not None) == (family == "phi2"), case
