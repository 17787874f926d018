"""Tiny teachers of every supported model family, with the Hugging Face config.json each would ship
with, and their logits through torchtune and through transformers (``tests/models/``). (The
assets of the recipe tests are ``tests/helpers/tune.py``.)

The HF configs are written as on the Hub (``rope_theta``, ``rope_scaling``, ``torch_dtype``), so
the export code meets the same fields it meets on real checkpoints.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torchtune.config._utils import _get_component_from_path
from torchtune.training import FullModelHFCheckpointer, ModelType

from tad_torchtune.models import FAMILIES, HFCheckpointer, correct_gemma2

VOCAB = 96
SEQ = 20  # > the Gemma2 sliding window below, so sliding layers are exercised

_COMMON = dict(vocab_size=VOCAB, num_layers=4, num_heads=4, num_kv_heads=2, embed_dim=32,
               max_seq_len=64)
_LLAMA3_ROPE = dict(low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192, rope_type="llama3")

# case name -> (family, teacher component kwargs, HF config.json)
CASES = {
    "llama2": ("llama2", dict(_COMMON, intermediate_dim=48, norm_eps=1e-5, rope_base=10000.0),
               dict(model_type="llama", architectures=["LlamaForCausalLM"], rope_theta=10000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=64)),
    "llama3": ("llama3", dict(_COMMON, intermediate_dim=48, norm_eps=1e-5, rope_base=500000),
               dict(model_type="llama", architectures=["LlamaForCausalLM"], rope_theta=500000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=64)),
    "llama3_1": ("llama3_1", dict(_COMMON, intermediate_dim=48, rope_base=500000, scale_factor=8),
                 dict(model_type="llama", architectures=["LlamaForCausalLM"],
                      rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      max_position_embeddings=131072, rope_scaling=dict(_LLAMA3_ROPE, factor=8.0))),
    "llama3_2": ("llama3_2", dict(_COMMON, intermediate_dim=48, rope_base=500000, scale_factor=32,
                                  tie_word_embeddings=True),
                 dict(model_type="llama", architectures=["LlamaForCausalLM"],
                      rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      max_position_embeddings=131072, head_dim=8,
                      rope_scaling=dict(_LLAMA3_ROPE, factor=32.0))),
    "qwen2": ("qwen2", dict(_COMMON, intermediate_dim=48, norm_eps=1e-6, rope_base=1e6),
              dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], rope_theta=1e6,
                   rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=64,
                   use_sliding_window=False, max_window_layers=4,
                   layer_types=["full_attention"] * 4)),
    "qwen2_5_tied": ("qwen2", dict(_COMMON, intermediate_dim=48, norm_eps=1e-6, rope_base=1e6,
                                   tie_word_embeddings=True),
                     dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], rope_theta=1e6,
                          rms_norm_eps=1e-6, tie_word_embeddings=True,
                          max_position_embeddings=64, use_sliding_window=False)),
    "gemma2": ("gemma2", dict(_COMMON, head_dim=16, intermediate_dim=48, norm_eps=1e-6,
                              rope_base=10000, hidden_capping_value=30.0,
                              final_capping_value=50.0, sliding_window_size=8),
               dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], head_dim=16,
                    rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                    max_position_embeddings=64, sliding_window=8, query_pre_attn_scalar=16,
                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                    hidden_activation="gelu_pytorch_tanh",
                    layer_types=["sliding_attention", "full_attention"] * 2)),
    "phi3": ("phi3", dict(_COMMON, intermediate_dim=48, norm_eps=1e-5, rope_base=10000),
             dict(model_type="phi3", architectures=["Phi3ForCausalLM"], rope_theta=10000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=64,
                  original_max_position_embeddings=64, sliding_window=None, rope_scaling=None)),
    "mistral": ("mistral", dict(_COMMON, intermediate_dim=48, norm_eps=1e-5, rope_base=10000),
                dict(model_type="mistral", architectures=["MistralForCausalLM"],
                     rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                     max_position_embeddings=64, sliding_window=None)),
    # the project's own Phi-2 builder: parallel blocks, 4 of 8 head dims rotated, biases
    # everywhere, LayerNorms, an output bias (tests/models/test_phi2.py: Phi-2's 0.4)
    "phi2": ("phi2", dict(_COMMON, intermediate_dim=48, norm_eps=1e-5, rope_base=10000.0,
                          partial_rotary_factor=0.5),
             dict(model_type="phi", architectures=["PhiForCausalLM"], hidden_act="gelu_new",
                  rope_theta=10000.0, partial_rotary_factor=0.5, layer_norm_eps=1e-5,
                  qk_layernorm=False, tie_word_embeddings=False, max_position_embeddings=64,
                  resid_pdrop=0.0, embd_pdrop=0.0)),
}


def teacher_node(case: str) -> dict:
    family, kwargs, _ = CASES[case]
    return {"_component_": FAMILIES[family].component, **kwargs}


def hf_config(case: str) -> dict:
    family, kw, extra = CASES[case]
    head_dim = kw.get("head_dim", kw["embed_dim"] // kw["num_heads"])
    cfg = dict(
        vocab_size=kw["vocab_size"], hidden_size=kw["embed_dim"],
        intermediate_size=kw["intermediate_dim"], num_hidden_layers=kw["num_layers"],
        num_attention_heads=kw["num_heads"], num_key_value_heads=kw["num_kv_heads"],
        hidden_act="silu", torch_dtype="float32", attention_dropout=0.0,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, transformers_version="4.45.0",
        _name_or_path=f"tiny-{case}-teacher",
    )
    if family == "gemma2":
        cfg.pop("hidden_act")
    cfg.update(extra)
    assert cfg.get("head_dim", head_dim) == head_dim
    return cfg


def randomize_(model: torch.nn.Module, seed: int, norm_center: float = 1.0) -> torch.nn.Module:
    """Weights large enough that every layer changes the logits noticeably.

    ``norm_center`` is 0 for Gemma's norms, which scale by ``1 + weight``.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1 and "bias" not in name:  # norm scales
                p.copy_(norm_center + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    return model


def build_teacher(case: str, seed: int = 0) -> torch.nn.Module:
    node = teacher_node(case)
    builder = _get_component_from_path(node.pop("_component_"))
    norm_center = 0.0 if CASES[case][0] == "gemma2" else 1.0
    return randomize_(correct_gemma2(builder(**node)), seed, norm_center)


def save_teacher_hf(case: str, teacher: torch.nn.Module, folder: Path) -> Path:
    """Write the teacher as a Hub-style checkpoint (weights in HF keys, config.json)."""
    cfg = hf_config(case)
    folder.mkdir(parents=True, exist_ok=True)
    hf_sd = FAMILIES[CASES[case][0]].to_hf(teacher.state_dict(), cfg)
    sd = {k: v.clone().contiguous() for k, v in hf_sd.items()}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def load_with_checkpointer(case: str, folder: Path, output_dir: Path) -> dict:
    """torchtune's own loading path, as the recipe uses it; for a family torchtune has no
    ``ModelType`` for (Phi-2), the project's ``HFCheckpointer``, which configs name instead."""
    model_type = FAMILIES[CASES[case][0]].checkpointer_model_type
    known = model_type in ModelType.__members__
    checkpointer = FullModelHFCheckpointer if known else HFCheckpointer
    ckpt = checkpointer(
        checkpoint_dir=str(folder), checkpoint_files=["model.safetensors"],
        model_type=model_type, output_dir=str(output_dir),
    )
    return ckpt.load_checkpoint()["model"]


#: logits of a torchtune model and of transformers' loading of its export agree within (fp32)
ATOL = 1e-4


def logits_of(model, tokens):
    """``[B, T, V]`` float32 logits of a torchtune model (the package's forward)."""
    from tad_torchtune.models import forward_hidden, project_logits

    with torch.no_grad():
        return project_logits(model, forward_hidden(model, tokens)[0]).float()


def hf_logits(folder, tokens):
    """Logits of the Hugging Face folder loaded by ``transformers.AutoModelForCausalLM``."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        return hf.eval()(tokens).logits.float()


def teacher_via_checkpointer(case, tmp_path):
    """A teacher saved as on the Hub, reloaded into a fresh torchtune model as the recipe does."""
    folder = save_teacher_hf(case, build_teacher(case), tmp_path / "teacher")
    node = teacher_node(case)
    teacher = correct_gemma2(_get_component_from_path(node.pop("_component_"))(**node))
    teacher.load_state_dict(load_with_checkpointer(case, folder, tmp_path / "teacher_out"))
    return teacher, folder


def save_hf_llama(path: Path, seed: int, *, tied: bool = False, vocab: int = 2048) -> Path:
    """A random 2-layer ``transformers.LlamaForCausalLM`` saved at ``path`` (the demo tokenizer's
    2048 ids), its output larger than the default init so the metrics are not trivial."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=500000.0, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1,
    )
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger logits than the default init, so the metrics are not trivial
        model.lm_head.weight.normal_(0, 0.5) if not tied else model.model.embed_tokens.weight.normal_(0, 0.5)
    model.save_pretrained(path)
    return path
