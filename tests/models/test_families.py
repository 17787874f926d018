"""Model families (``models/_families.py``): one ``register_family`` call is all a new family
needs, and a config.json no family can build is named."""

import pytest
import torch

from tad_torchtune.models import init_student_from_teacher, pruned_student, save_hf_checkpoint
from tests.helpers.teachers import ATOL, SEQ, VOCAB, hf_config, hf_logits, logits_of, randomize_


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
        ours = logits_of(student, tokens)
        torch.testing.assert_close(hf_logits(out, tokens), ours, atol=ATOL, rtol=0)
    finally:
        FAMILIES.pop("gemma")


def test_model_from_hf_config_names_what_no_family_can_build():
    from tad_torchtune.models import model_from_hf_config

    cfg = hf_config("llama3_1")
    cfg["rope_scaling"] = dict(cfg["rope_scaling"], high_freq_factor=2.0)
    with pytest.raises(ValueError, match=r"students.x: no registered model family builds "
                                         r"model_type='llama' \(llama2: no RoPE scaling"):
        model_from_hf_config(cfg, where="students.x")
    with pytest.raises(ValueError, match=r"model_type='gpt2' \(registered model types: "):
        model_from_hf_config({"model_type": "gpt2"}, where="students.x")
