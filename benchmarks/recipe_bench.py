"""The recipe's own training step against a minimal loop doing the same work: tokens/s, the
recipe's overhead as a ratio, MFU, peak memory and where a step's time goes.

    python benchmarks/recipe_bench.py [--device cpu|cuda] [--archs demo small ...]
        [--variants unfused fused ...] [--steps 20] [--warmup 3] [--seq N] [--batch B]
        [--json PATH]

Per architecture (``ARCHS``: tiny ones for the CPU, the shipped configs' real teacher/student
pairs for a GPU) and variant (``VARIANTS``: fused or unfused head, compile, activation
checkpointing), on a teacher with random weights and synthetic token blocks (no download):

- the recipe: ``TADDistillRecipe`` set up from a config and stepped with its own
  ``train_step`` (data loader, collation, ``_prepare``, the teacher and student heads, the
  step's one host synchronisation, throughput, logging every step). The only method replaced is
  ``_load_teacher_state``, which builds random teacher weights instead of reading a checkpoint;
- a minimal loop over the SAME models, optimizer and batches: teacher forward without autograd,
  student forward, the same loss functions (chunked CE + the divergence, or the fused head),
  backward, gradient clipping, the optimizer step;

taking turns step by step (A B A B ...), so both see the same machine. Reported: tokens/s of each
(median over steps), the recipe/minimal ratio (median of the per-round ratios of their steps'
times), MFU (``tad_torchtune.flops``; peak FLOP/s: the known GPU's, or on a CPU the best float32
matmul rate measured in this process, so CPU "MFU" is against what this CPU's matmul achieves),
peak memory (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS) and the time split of a
recipe step into teacher forward, student forward + losses, backward, optimizer and the rest
(measured in a separate pass, with synchronised timers).
"""

import argparse
import importlib.util
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
# The installed project where there is one (an installed wheel holds tad_torchtune.configs, which
# the shipped configs' architectures read; a checkout has configs/ beside the package), else
# this checkout and its recipes.
if importlib.util.find_spec("tad_torchtune") is None:
    sys.path.insert(0, str(ROOT))
if importlib.util.find_spec("tad_distill") is None:
    sys.path.insert(0, str(ROOT / "recipes"))

import tad_distill  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from tad_torchtune.common import IGNORE_INDEX, shift_labels  # noqa: E402
from tad_torchtune.schema import validate_config  # noqa: E402
from tad_torchtune.flops import peak_flops, step_flops_per_token  # noqa: E402
from tad_torchtune.head import StudentHead, TeacherHead  # noqa: E402
from tad_torchtune.losses.ce import chunked_cross_entropy  # noqa: E402
from tad_torchtune.losses.fused import fused_head  # noqa: E402
from tad_torchtune.models import (  # noqa: E402
    build_model,
    forward_hidden,
    output_weight,
    project_logits,
    resolve_teacher,
)

_LLAMA = "torchtune.models.llama3._component_builders.llama3"
ARCHS: dict[str, dict[str, Any]] = {
    # the bundled demo's models and batches (configs/demo.yaml)
    "demo": dict(teacher={"_component_": _LLAMA, "vocab_size": 2048, "num_layers": 4,
                          "num_heads": 4, "num_kv_heads": 2, "embed_dim": 192,
                          "intermediate_dim": 512, "max_seq_len": 256, "rope_base": 500000},
                 student=dict(num_layers=2, intermediate_dim=256), seq=128, batch=8,
                 chunk=4096),
    # a larger CPU-sized pair: 8K vocabulary, 6 -> 3 layers of width 384
    "small": dict(teacher={"_component_": _LLAMA, "vocab_size": 8192, "num_layers": 6,
                           "num_heads": 6, "num_kv_heads": 2, "embed_dim": 384,
                           "intermediate_dim": 1024, "max_seq_len": 512, "rope_base": 500000},
                  student=dict(num_layers=3, intermediate_dim=768), seq=256, batch=4,
                  chunk=1024),
    # the shipped configs' teacher/student pairs (GPU)
    "qwen2_5_3b_half": dict(config="qwen2_5_3b_to_half", seq=2048, batch=4, chunk=None),
    "qwen1_5_1_8b_to_1_2b": dict(config="qwen1_5_1_8b_to_1_2b", seq=2048, batch=4, chunk=None),
    # Gemma2-9B at full width with 14 of its 42 layers, so teacher and student fit one GPU
    "gemma2_9b_third_short": dict(config="gemma2_9b_to_third", teacher_layers=14,
                                  student=dict(num_layers=5), seq=2048, batch=2, chunk=None),
}
VARIANTS = {
    "unfused": {}, "fused": {"fused": True},
    "unfused_compiled": {"compile": True}, "fused_compiled": {"fused": True, "compile": True},
    "unfused_ac": {"enable_activation_checkpointing": True},
    "fused_ac": {"fused": True, "enable_activation_checkpointing": True},
    "fused_compiled_ac": {"fused": True, "compile": True,
                          "enable_activation_checkpointing": True},
}


# ------------------------------------------------------------ components the config points at


class NullTokenizer:
    """The tokenizer of synthetic data: nothing to encode."""

    pad_id = 0
    bos_id, eos_id = 0, 1


def null_tokenizer() -> NullTokenizer:
    return NullTokenizer()


class SyntheticBlocks(torch.utils.data.Dataset):
    """Random token blocks of ``max_seq_len`` (the recipe batches them like a token store's)."""

    fingerprint = "synthetic"

    def __init__(self, tokenizer: Any, *, vocab_size: int, max_seq_len: int, num_blocks: int,
                 seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, vocab_size, (num_blocks, max_seq_len), generator=gen)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        t = self.tokens[i]
        return {"tokens": t, "labels": t, "document_ids": torch.zeros_like(t)}


def synthetic_blocks(tokenizer: Any, **kwargs: Any) -> SyntheticBlocks:
    return SyntheticBlocks(tokenizer, **kwargs)


class BenchRecipe(tad_distill.TADDistillRecipe):
    """The recipe with random teacher weights instead of a checkpoint."""

    def _load_teacher_state(self, cfg):
        with torch.device(self._device):
            model, _ = build_model(cfg.teacher_model)
        return {k: v.to(self._dtype) for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------- the config


def arch_nodes(name: str) -> tuple[dict, dict, dict]:
    """(teacher node, student node, shapes) of an architecture."""
    arch = ARCHS[name]
    if "config" in arch:
        from tad_torchtune.demo import bundled_config

        cfg = OmegaConf.create(bundled_config(arch["config"]))
        teacher = OmegaConf.to_container(cfg.teacher_model, resolve=True)
        student = OmegaConf.to_container(cfg.student_model, resolve=False)
        student.pop("teacher", None)
        if arch.get("teacher_layers"):
            _, kwargs = resolve_teacher(teacher)
            teacher = {"_component_": resolve_teacher(teacher)[0].component,
                       **{**kwargs, "num_layers": arch["teacher_layers"]}}
            student.pop("teacher_layers", None)
        student.update(arch.get("student", {}))
    else:
        teacher, student = dict(arch["teacher"]), dict(arch["student"])
    student = {"_component_": "tad_torchtune.models.pruned_student", "teacher": teacher, **student}
    return teacher, student, arch


def recipe_config(arch_name: str, variant: str, device: str, out: Path, *, steps: int,
                  seq: int | None, batch: int | None, peak: float | None) -> dict:
    teacher, student, arch = arch_nodes(arch_name)
    seq, batch = seq or arch["seq"], batch or arch["batch"]
    family, kwargs = resolve_teacher(teacher)
    hf = out / "teacher_hf"
    hf.mkdir(parents=True, exist_ok=True)
    (hf / "config.json").write_text(json.dumps({"model_type": family.hf_model_type}))
    cfg = {
        "output_dir": str(out / "run"), "seed": 0, "device": device,
        "dtype": "bf16" if device == "cuda" else "fp32",
        "tokenizer": {"_component_": "recipe_bench.null_tokenizer"},
        "dataset": {"_component_": "recipe_bench.synthetic_blocks",
                    "vocab_size": kwargs["vocab_size"], "max_seq_len": seq,
                    "num_blocks": batch * (2 * steps + 8)},
        "batch_size": batch, "gradient_accumulation_steps": 1,
        "teacher_model": teacher,
        "teacher_checkpointer": {"_component_": "torchtune.training.FullModelHFCheckpointer",
                                 "checkpoint_dir": str(hf), "checkpoint_files": [],
                                 "model_type": family.checkpointer_model_type,
                                 "output_dir": str(out / "unused")},
        "student_model": student,
        "kd_loss": {"_component_": "tad_torchtune.losses.TADLoss", "k": 10, "beta": 2.0},
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-5,
                      **({"fused": True} if device == "cuda" else {})},
        "clip_grad_norm": 1.0, "max_steps": 10**6, "log_every_n_steps": 1, "export_hf": False,
        "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger",
                          "log_dir": str(out / "logs")},
        "peak_flops_per_device": peak,
        **VARIANTS[variant],
    }
    if arch.get("chunk"):
        cfg["loss_chunk_size"] = arch["chunk"]
    return cfg


# ------------------------------------------------------------------------------- measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cpu_matmul_peak(repeats: int = 5, n: int = 2048) -> float:
    """The best float32 matmul rate (FLOP/s) of this CPU with the current threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def minimal_step(recipe, batch: dict[str, torch.Tensor]) -> None:
    """The same work as a recipe step, written as a hand-rolled loop would."""
    device, head = recipe._device, recipe._head
    tokens = batch["tokens"].to(device)
    labels = shift_labels(batch["labels"]).to(device)
    n = (labels != IGNORE_INDEX).sum()
    kd = head.kd_loss
    with torch.no_grad():
        t_hidden, _ = forward_hidden(recipe._teacher, tokens)
        t_logits = None if head.fused else project_logits(recipe._teacher, t_hidden)
    hidden, _ = forward_hidden(recipe._student, tokens)
    if head.fused:
        loss = fused_head(hidden, output_weight(recipe._student), labels, divergence=kd,
                          teacher_hidden=t_hidden, teacher_weight=output_weight(recipe._teacher),
                          teacher_softcap=recipe._teacher_head.softcap, student_softcap=head.softcap,
                          compute_ce=True, chunk_size=head.chunk_size,
                          **head.fused_options).objective
    else:
        logits = project_logits(recipe._student, hidden)
        ce, _ = chunked_cross_entropy(logits, labels, chunk_size=head.chunk_size)
        loss = ce + head._kd_sum_and_count(logits, t_logits, labels).total
    (loss / n).backward()
    torch.nn.utils.clip_grad_norm_([p for p in head.parameters() if p.requires_grad], 1.0)
    recipe._optimizer.step()
    recipe._optimizer.zero_grad(set_to_none=True)
    _sync(device)


def time_split(recipe, batches, steps: int) -> dict[str, float]:
    """Mean seconds per step in each part of a recipe step, with synchronised timers around the
    teacher head, the student head, backward and the optimizer step; "other" is the rest (data,
    preparation, clipping, the host synchronisation, logging)."""
    parts = {"teacher_forward": 0.0, "student_forward_and_losses": 0.0, "backward": 0.0,
             "optimizer": 0.0}
    device = recipe._device

    def timed(name, fn):
        def run(*args, **kwargs):
            _sync(device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            _sync(device)
            parts[name] += time.perf_counter() - t0
            return out

        return run

    saved = (TeacherHead.__call__, StudentHead.forward, torch.Tensor.backward,
             recipe._optimizer.step)
    TeacherHead.__call__ = timed("teacher_forward", TeacherHead.__call__)
    StudentHead.forward = timed("student_forward_and_losses", StudentHead.forward)
    torch.Tensor.backward = timed("backward", torch.Tensor.backward)
    recipe._optimizer.step = timed("optimizer", recipe._optimizer.step)
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            recipe.train_step(batches)
        _sync(device)
        total = time.perf_counter() - t0
    finally:
        TeacherHead.__call__, StudentHead.forward, torch.Tensor.backward = saved[:3]
        recipe._optimizer.step = saved[3]
    out = {k: v / steps for k, v in parts.items()}
    out["other"] = total / steps - sum(out.values())
    return out


def bench(arch: str, variant: str, device: str, *, steps: int, warmup: int, seq, batch,
          peak: float | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = OmegaConf.create(recipe_config(arch, variant, device, Path(tmp), steps=steps,
                                             seq=seq, batch=batch, peak=peak))
        validate_config(cfg)
        recipe = BenchRecipe(cfg)
        recipe.setup(cfg)
        try:
            return _measure(recipe, cfg, steps=steps, warmup=warmup, arch=arch, variant=variant)
        finally:
            recipe.cleanup()


def _measure(recipe, cfg, *, steps: int, warmup: int, arch: str, variant: str) -> dict[str, Any]:
    device = recipe._device
    recipe._train_sampler.set_position(0, 0)
    batches = iter(recipe._train_loader)
    spare = iter(recipe._train_loader)  # the minimal loop's batches (same shapes)
    for _ in range(warmup):  # compiles, allocator warm-up, both paths
        recipe.train_step(batches)
        minimal_step(recipe, next(spare))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rec, mini = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        recipe.train_step(batches)
        rec.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        minimal_step(recipe, next(spare))
        mini.append(time.perf_counter() - t0)
    rows, length = cfg.batch_size, cfg.dataset.max_seq_len
    tokens = rows * (length - 1)  # valid (predicted) tokens of a batch
    flops = step_flops_per_token(recipe._student, recipe._teacher, length) * rows * length
    peak = recipe._peak_flops
    memory = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    split = time_split(recipe, batches, max(3, steps // 4))
    return {
        "arch": arch, "variant": variant, "device": str(device), "batch": rows, "seq": length,
        "recipe_tokens_per_second": tokens / statistics.median(rec),
        "minimal_tokens_per_second": tokens / statistics.median(mini),
        "recipe_over_minimal": statistics.median(m / r for r, m in zip(rec, mini)),
        "mfu": flops / statistics.median(rec) / peak if peak else None,
        "peak_flops": peak, "flops_per_step": flops,
        "peak_memory_gib": memory,
        "memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS",
        "split_seconds": split, "recipe_step_seconds": statistics.median(rec),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--archs", nargs="+", default=None, choices=list(ARCHS))
    parser.add_argument("--variants", nargs="+", default=["unfused", "fused"],
                        choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    archs = args.archs or (["demo", "small"] if args.device == "cpu" else ["qwen2_5_3b_half"])
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    peak = peak_flops(torch.device(args.device), dtype)
    if args.device == "cpu":
        peak = cpu_matmul_peak()
    rows = []
    for arch in archs:
        for variant in args.variants:
            row = bench(arch, variant, args.device, steps=args.steps, warmup=args.warmup,
                        seq=args.seq, batch=args.batch, peak=peak)
            rows.append(row)
            split = " ".join(f"{k}={v * 1e3:.1f}ms" for k, v in row["split_seconds"].items())
            mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
            print(f"{arch:<22}{variant:<18} recipe {row['recipe_tokens_per_second']:>9.0f} tok/s"
                  f"  minimal {row['minimal_tokens_per_second']:>9.0f}  ratio "
                  f"{row['recipe_over_minimal']:.3f}  MFU {mfu}  mem {row['peak_memory_gib']:.2f}"
                  f" GiB  | {split}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"peak_flops": peak, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
