"""Tiny teachers of every supported model family, with the Hugging Face config.json each would ship
with, and their logits through torchtune and through transformers (``tests/models/``). (The
assets of the recipe tests are ``tests/helpers/tune.py``.)

The HF configs are written as on the Hub (``rope_theta``, ``rope_scaling``, ``torch_dtype``), so
the export code meets the same fields it meets on real checkpoints.
"""

import contextlib
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torchtune.config._utils import _get_component_from_path
from torchtune.training import FullModelHFCheckpointer, ModelType

from tad_torchtune.models import FAMILIES, HFCheckpointer, correct_gemma2, resolve_teacher

VOCAB = 96
SEQ = 20  # > the sliding windows below (Gemma2, Phi-3, Mistral), so they are exercised

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
                  original_max_position_embeddings=64, rope_scaling=None,
                  sliding_window=8)),  # the Hub's Phi-3-mini-4k has 2047; SEQ rows exceed 8
    "mistral": ("mistral", dict(_COMMON, intermediate_dim=48, norm_eps=1e-5, rope_base=10000),
                dict(model_type="mistral", architectures=["MistralForCausalLM"],
                     rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                     max_position_embeddings=64,
                     sliding_window=8)),  # Mistral-7B-v0.1's is 4096; SEQ rows exceed 8
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


#: the torchtune component kwargs of ``save_hf_windowed``'s models
WINDOWED = dict(vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
                intermediate_dim=96, max_seq_len=64, norm_eps=1e-5, rope_base=10000)


def save_hf_windowed(path: Path, family: str, *, window: int | None, seed: int = 0) -> Path:
    """A random 2-layer ``transformers.MistralForCausalLM`` or ``Phi3ForCausalLM`` (``family``:
    ``"mistral"``, ``"phi3"``; the widths of ``WINDOWED``) whose attention is limited to the
    ``window`` latest positions (config.json's ``sliding_window``), saved at ``path``; its
    weights as large as ``randomize_``'s, so that every position changes the logits."""
    import transformers

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                  sliding_window=window, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    else:
        model = transformers.Phi3ForCausalLM(
            transformers.Phi3Config(**common, original_max_position_embeddings=64))
    randomize_(model, seed)
    model.save_pretrained(path)
    return path


def windowed_node(family: str) -> dict:
    """The YAML model node of ``save_hf_windowed``'s model: its family's component builder."""
    return {"_component_": FAMILIES[family].component, **WINDOWED}


def windowed_checkpointer(family: str, folder: Path, output_dir: Path) -> dict:
    """The recipe's checkpointer node of a ``save_hf_windowed`` folder (torchtune's own)."""
    return {"_component_": "torchtune.training.FullModelHFCheckpointer",
            "checkpoint_dir": str(folder), "checkpoint_files": ["model.safetensors"],
            "model_type": FAMILIES[family].checkpointer_model_type,
            "output_dir": str(output_dir)}


# --------------------------------------------------------------------------------------------
# Shipped configs at tiny size: the model nodes of configs/*.yaml rewritten as their family's
# component builder with every width divided by a factor (depths and head counts kept), used by
# tests/models/test_configs.py (factor SHRINK) and the dress rehearsals of
# tests/recipes/test_shipped_configs.py (the largest factor the heads allow).

SHRINK = 16  # tests/models/test_configs.py: every width (embed, intermediate, head) divided by 16
WIDTHS = ("embed_dim", "intermediate_dim", "head_dim")
PRUNED_STUDENT = "tad_torchtune.models.pruned_student"
TINY_MAX_SEQ_LEN = 64  # the RoPE cache of a tiny model: longer than any test's block


def tiny_vocab(v: int) -> int:
    # keeps equal vocabularies equal and a larger teacher larger (32064 -> 320, 32000 -> 256)
    return 256 + v % 256


def shrink_node(node, shrink: int = SHRINK) -> dict:
    """A real-size model node rewritten as the family's component builder at tiny widths: every
    width divided by ``shrink`` (``embed_dim`` down to a multiple of ``num_heads``), depth, head
    counts and every other argument kept, the vocabulary ``tiny_vocab``."""
    family, kwargs = resolve_teacher(node)
    _shrink_widths(kwargs, shrink, kwargs["num_heads"])
    kwargs["vocab_size"] = tiny_vocab(kwargs["vocab_size"])
    kwargs["max_seq_len"] = TINY_MAX_SEQ_LEN
    return {"_component_": FAMILIES[family.name].component, **kwargs}


def _shrink_widths(node, shrink: int, num_heads: int) -> None:
    for key in WIDTHS:
        if node.get(key):
            node[key] //= shrink
    if node.get("embed_dim"):  # a multiple of num_heads, as torchtune's Gemma2 attention asks
        node["embed_dim"] = max(num_heads, node["embed_dim"] - node["embed_dim"] % num_heads)


def _rotary_ok(kwargs: dict, head_dim: int) -> bool:
    # Whole rotary pairs, two of them: a single pair turns at frequency 1 whatever the RoPE base,
    # so a wrong base would go unseen. A head that rotates a share of itself (Phi-2's 0.4) needs
    # one pair only: two would take heads of 10, a 40M-parameter tiny Phi-2.
    factor = kwargs.get("partial_rotary_factor")
    rotated = head_dim if factor is None else int(factor * head_dim)
    return rotated >= (4 if factor is None else 2) and rotated % 2 == 0


def _head_dim(kwargs: dict) -> int:
    return kwargs.get("head_dim") or kwargs["embed_dim"] // kwargs["num_heads"]


def largest_shrink(*models: dict) -> int:
    """The largest factor that divides the head size of every model in ``models`` (component
    kwargs) into a head of whole rotary pairs, two of them (Qwen2.5-3B's 128 -> 4; Phi-2's
    80 -> 5, 2 of them rotated). The models are shrunk together: a pruned student and its
    teacher share the factor, so the student stays the same fraction of the teacher."""
    heads = [_head_dim(kw) for kw in models]
    for factor in range(min(heads), 0, -1):
        if all(h % factor == 0 and _rotary_ok(kw, h // factor) for kw, h in zip(models, heads)):
            return factor
    raise AssertionError(f"no width factor fits heads {heads}")


def _pruned_kwargs(teacher_kwargs: dict, student: dict) -> dict:
    # what pruned_student makes of the teacher's kwargs (only what the head size depends on)
    return {**teacher_kwargs,
            **{k: student[k] for k in ("embed_dim", "num_heads", "head_dim") if student.get(k)}}


def shrink_config(cfg, shrink: int | None = SHRINK):
    """``cfg`` (a shipped config) with its ``teacher_model`` and ``student_model`` at tiny widths
    (``shrink_node``). A ``pruned_student`` keeps its node, its widths divided by the teacher's
    factor. ``shrink=None``: each model (a pruned student with its teacher) divided by its
    ``largest_shrink``."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    teacher_kwargs = resolve_teacher(cfg.teacher_model)[1]
    student = cfg.student_model
    pruned = student._component_ == PRUNED_STUDENT
    if shrink is None:
        together = [teacher_kwargs]
        if pruned:
            together.append(_pruned_kwargs(teacher_kwargs, OmegaConf.to_container(student)))
        t_shrink = largest_shrink(*together)
    else:
        t_shrink = shrink
    cfg.teacher_model = shrink_node(cfg.teacher_model, t_shrink)
    if pruned:
        _shrink_widths(student, t_shrink, student.get("num_heads") or teacher_kwargs["num_heads"])
    else:
        s_shrink = shrink or largest_shrink(resolve_teacher(student)[1])
        cfg.student_model = shrink_node(student, s_shrink)
    merges = cfg.get("teacher_id_merges")
    if merges:  # the teacher's ids past the student's, at the same offsets past the tiny one's
        real = teacher_kwargs["vocab_size"] if pruned else \
            resolve_teacher(OmegaConf.create(OmegaConf.to_container(student)))[1]["vocab_size"]
        cfg.teacher_id_merges = {tiny_vocab(real) + int(k) - real: v for k, v in merges.items()}
    return cfg


@contextlib.contextmanager
def one_rank_process_group(backend: str, monkeypatch):
    """This process as the only rank of a default process group of ``backend`` (torchrun's
    environment variables set for it), destroyed on exit."""
    import torch.distributed as dist

    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
    dist.init_process_group(backend, rank=0, world_size=1, store=dist.HashStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def check_sharded_loading(device: str, backend: str, cpu_offload: bool, tmp_path: Path,
                          monkeypatch) -> None:
    """One process as FSDP2's only rank (``backend``: the recipe's process group): a teacher
    and a pruned student of the tiny Qwen2 built on the meta device, sharded there (with
    ``cpu_offload``: FSDP2's CPU offload, the shards on the host) and loaded by ``load_teacher``
    / ``load_student`` as the recipes load them on several processes (``from_rank0``: the
    weights broadcast by rank 0 on the device); each sharded weight is a DTensor on the shards'
    device, equal to the checkpoint's; the teacher's logits equal the unsharded model's; the
    student takes one forward, backward and optimizer step (its gradients on the shards'
    device); the ranks' waiting group (gloo, beside it) broadcasts and waits."""
    from functools import partial

    import torch.distributed as dist
    from omegaconf import OmegaConf
    from torch.distributed.distributed_c10d import _get_object_coll_device
    from torch.distributed.tensor import DTensor

    from tad_torchtune.models.loading import load_student, load_teacher
    from tad_torchtune.parallel import parallelize, waiting_group

    with one_rank_process_group(backend, monkeypatch):
        dev = torch.device(device)
        shards_on = torch.device("cpu") if cpu_offload else dev
        reference = build_teacher("qwen2").to(dev).eval()
        state = {k: v.cpu() for k, v in reference.state_dict().items()}
        ckpt = OmegaConf.create({"checkpoint_dir": str(tmp_path), "model_type": "QWEN2"})
        node = OmegaConf.create(teacher_node("qwen2"))
        teacher = load_teacher(node, ckpt, device=dev, dtype=torch.float32, state=dict(state),
                               shard_device=shards_on, from_rank0=True,
                               prepare=partial(parallelize, fsdp=True, cpu_offload=cpu_offload))
        sharded = {n: p for n, p in teacher.named_parameters() if isinstance(p, DTensor)}
        assert sharded and all(p.device.type == shards_on.type for p in sharded.values())
        for name, p in sharded.items():
            assert torch.equal(p.to_local().cpu(), state[name]), name
        tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            got, want = teacher(tokens.to(dev)), reference(tokens.to(dev))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

        student_node = OmegaConf.create({"_component_": "tad_torchtune.models.pruned_student",
                                         "teacher": teacher_node("qwen2"), "num_layers": 2})
        student, _, _ = load_student(
            student_node, teacher_state=state, teacher_checkpointer=ckpt,
            student_checkpointer=None, device=dev, dtype=torch.float32, seed=0,
            shard_device=shards_on, from_rank0=True,
            prepare=lambda s: parallelize(s, fsdp=True, cpu_offload=cpu_offload, root=s))
        trainable = [p for p in student.parameters() if p.requires_grad]
        assert trainable and all(p.device.type == shards_on.type for p in trainable)
        optimizer = torch.optim.AdamW(trainable, lr=1e-3)
        student(tokens.to(dev)).float().pow(2).mean().backward()
        assert all(p.grad is not None and p.grad.device.type == shards_on.type for p in trainable)
        optimizer.step()

        # the gloo group the ranks wait on beside the recipe's group (NCCL's on a GPU)
        group = waiting_group()
        assert dist.get_backend(group) == "gloo" and _get_object_coll_device(group) == "cpu"
        payload = [{"vocab": VOCAB}] if dist.get_rank() == 0 else [None]
        dist.broadcast_object_list(payload, src=0, group=group)
        dist.barrier(group=group)
        assert payload == [{"vocab": VOCAB}] and waiting_group() is group
