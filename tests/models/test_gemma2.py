"""torchtune's Gemma2 corrected (``models/_gemma2.py``), with transformers as the reference."""

import json

import pytest
import torch
from torchtune.models.gemma2 import gemma2
from transformers import Gemma2Config, Gemma2ForCausalLM

from tad_torchtune.models import (
    correct_gemma2,
    init_student_from_teacher,
    pruned_student,
    save_hf_checkpoint,
)
from tests.helpers.teachers import (
    ATOL,
    SEQ,
    VOCAB,
    build_teacher,
    hf_config,
    hf_logits,
    load_with_checkpointer,
    logits_of,
    randomize_,
    teacher_node,
)


def _tiny_hf_gemma2(tmp_path):
    cfg = hf_config("gemma2")
    # eager: transformers' SDPA path drops Gemma2's attention soft-cap (5.17 picks SDPA by default)
    hf = Gemma2ForCausalLM(Gemma2Config(**cfg, attn_implementation="eager")).eval()
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
    torch.testing.assert_close(logits_of(fixed, tokens), reference, atol=ATOL, rtol=0)
    torch.testing.assert_close(forward_logits, reference, atol=ATOL, rtol=0)
    # and the uncorrected torchtune model really is different
    assert (logits_of(raw, tokens) - reference).abs().max() > 0.1


def test_correct_gemma2_is_idempotent_and_a_no_op_elsewhere():
    node = teacher_node("gemma2")
    node.pop("_component_")
    model = randomize_(gemma2(**node), seed=0, norm_center=0.0)
    keys = list(model.state_dict())
    tokens = torch.randint(0, VOCAB, (1, SEQ))
    once = logits_of(correct_gemma2(model), tokens)
    twice = logits_of(correct_gemma2(model), tokens)
    assert torch.equal(once, twice) and list(model.state_dict()) == keys
    assert model.logit_softcap == 30.0
    assert all(layer.attn.softcapping == 50.0 for layer in model.layers)

    llama = build_teacher("llama3")
    ref = logits_of(llama, tokens)
    assert correct_gemma2(llama) is llama and not hasattr(llama, "logit_softcap")
    assert torch.equal(logits_of(llama, tokens), ref)


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
    torch.testing.assert_close(hf_logits(out, tokens), logits_of(student, tokens), atol=ATOL, rtol=0)


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
    assert torch.equal(logits_of(wrapped, tokens), logits_of(reference, tokens))

    class ShardedLayer(TransformerSelfAttentionLayer):  # stands in for FSDP2's dynamic subclass
        pass

    other = gemma2(**node)
    other.layers[0].__class__ = ShardedLayer
    with pytest.raises(ValueError, match="before FSDP"):
        correct_gemma2(other)
