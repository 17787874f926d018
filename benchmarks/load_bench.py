"""Loading a teacher: the project's way (``models.loading.load_teacher``: built on the meta device,
the checkpoint's tensors assigned, RoPE caches rebuilt) against building the model on the device
and loading the checkpoint into it (what ``load_teacher`` did before, and torchtune's
single-device recipes do). Seconds and peak resident memory, each way in a fresh process, and a
hash of the loaded model's weights and buffers, which must be the same for both.

    python benchmarks/load_bench.py [--model torchtune.models.qwen2_5.qwen2_5_3b]
        [--dtype bf16] [--json PATH]
    python benchmarks/load_bench.py --nproc 2 [--model ...] [--dtype bf16] [--json PATH]

``--model``: a builder's dotted path, or a model node as JSON (``{"_component_": ..., ...}``).

With ``--nproc N``, the teacher is loaded into FSDP2's shards on N CPU processes (gloo, under
``torch.distributed.run``), both ways the recipes can: ``fsdp_every``, every rank holding the
checkpoint (as each would read it), and ``fsdp_rank0``, rank 0 alone holding it and
broadcasting it tensor by tensor (``load_teacher(..., from_rank0=True)``, what ``tad_distill``
does on several processes). Per rank: seconds and peak resident memory; the hash is of the
gathered weights.

The checkpoint is random (seeded) and already in memory, as ``checkpoint_state`` hands it to the
recipes: reading the files costs both ways the same and is not timed.
"""

import argparse
import hashlib
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WAYS = ("meta", "build_then_load")
SHARDED_WAYS = ("fsdp_every", "fsdp_rank0")


def checkpoint(node, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A random torchtune-format state dict of ``node``'s model, in ``dtype``."""
    from tad_torchtune.models import build_model

    with torch.device("meta"):
        model, _ = build_model(node)
    gen = torch.Generator().manual_seed(0)
    return {name: torch.randn(t.shape, generator=gen).to(dtype)
            for name, t in model.state_dict().items()}


def model_node(component: str):
    """``--model`` as a config node: a builder's dotted path, or a node as JSON."""
    from omegaconf import OmegaConf

    return OmegaConf.create(json.loads(component) if component.lstrip().startswith("{")
                            else {"_component_": component})


#: the checkpointer node ``load_teacher`` is given: no folder, so no config.json fix-up input
NO_FOLDER = {"checkpoint_dir": str(ROOT / "nonexistent")}


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """A hash of every byte of ``tensors``, with their names and dtypes."""
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def one(way: str, component: str, dtype_name: str) -> dict:
    from omegaconf import OmegaConf
    from torchtune import training

    from tad_torchtune.common import DTYPES
    from tad_torchtune.models import build_model
    from tad_torchtune.models.loading import load_teacher

    dtype = DTYPES[dtype_name]
    node = model_node(component)
    state = checkpoint(node, dtype)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if way == "meta":
        model = load_teacher(node, OmegaConf.create(NO_FOLDER), device=torch.device("cpu"),
                             dtype=dtype, state=state)
    else:
        with training.set_default_dtype(dtype):
            model, _ = build_model(node)
        model.load_state_dict(state)
        model.eval().requires_grad_(False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"way": way, "seconds": round(seconds, 3), "peak_rss_gib": round(peak / 2**20, 2),
            "added_rss_gib": round((peak - before) / 2**20, 2),
            "params": sum(p.numel() for p in model.parameters()),
            "digest": digest({**model.state_dict(), **dict(model.named_buffers())})}


def sharded(way: str, component: str, dtype_name: str, out: Path) -> None:
    """One rank of ``--nproc``: load the teacher into its shards; write OUT/rank<r>.json."""
    from functools import partial

    import torch.distributed as dist
    from omegaconf import OmegaConf
    from torch.distributed.tensor import DTensor

    from tad_torchtune.common import DTYPES
    from tad_torchtune.models.loading import load_teacher
    from tad_torchtune.parallel import parallelize

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    dtype = DTYPES[dtype_name]
    node = model_node(component)
    from_rank0 = way == "fsdp_rank0"
    state = checkpoint(node, dtype) if rank == 0 or not from_rank0 else None
    dist.barrier()
    start = time.perf_counter()
    model = load_teacher(node, OmegaConf.create(NO_FOLDER), device=torch.device("cpu"),
                         dtype=dtype, state=state, prepare=partial(parallelize, fsdp=True),
                         from_rank0=from_rank0)
    del state
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel()
                for p in model.parameters())
    # the gathered weights (a collective: every rank), hashed on rank 0
    gathered = {n: (t.full_tensor() if isinstance(t, DTensor) else t)
                for n, t in model.state_dict().items()}
    row = {"way": way, "rank": rank, "seconds": round(seconds, 3),
           "peak_rss_gib": round(peak / 2**20, 2), "local_params": local}
    if rank == 0:
        row["digest"] = digest(gathered)
    (out / f"rank{rank}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


def run_sharded(args) -> dict:
    import os
    import tempfile

    rows = {}
    for way in SHARDED_WAYS:
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                 str(args.nproc), __file__, "--model", args.model, "--dtype", args.dtype,
                 "--way", way, "--out", tmp],
                capture_output=True, text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
                    p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)})
            if proc.returncode != 0:
                raise SystemExit(f"load_bench: {way} failed ({proc.returncode}):\n"
                                 f"{proc.stderr[-4000:]}")
            rows[way] = [json.loads((Path(tmp) / f"rank{r}.json").read_text())
                         for r in range(args.nproc)]
        print(f"{way:11s} " + "  ".join(
            f"rank {r['rank']}: {r['seconds']:.2f} s, peak RSS {r['peak_rss_gib']:.2f} GiB"
            for r in rows[way]), flush=True)
    result = {"model": args.model, "dtype": args.dtype, "nproc": args.nproc,
              "torch": torch.__version__, "ways": rows,
              "same_weights": len({r[0]["digest"] for r in rows.values()}) == 1}
    print(f"same weights: {result['same_weights']}")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="torchtune.models.qwen2_5.qwen2_5_3b")
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--way", choices=WAYS + SHARDED_WAYS, help="one way, in this process")
    parser.add_argument("--nproc", type=int, default=1,
                        help="load into FSDP2's shards on this many CPU processes")
    parser.add_argument("--out", type=Path, help="(a rank of --nproc) where it writes its row")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.way in SHARDED_WAYS:
        sharded(args.way, args.model, args.dtype, args.out)
        return {}
    if args.nproc > 1:
        result = run_sharded(args)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return result
    if args.way:
        row = one(args.way, args.model, args.dtype)
        print(json.dumps(row))
        return row
    rows = {}
    for way in WAYS:
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--dtype",
                              args.dtype, "--way", way], capture_output=True, text=True,
                             check=True)
        rows[way] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{way:16s} {rows[way]['seconds']:8.2f} s  peak RSS {rows[way]['peak_rss_gib']:6.2f}"
              f" GiB (+{rows[way]['added_rss_gib']:.2f} loading)", flush=True)
    result = {"model": args.model, "dtype": args.dtype, "torch": torch.__version__,
              "machine": platform.machine(), "ways": rows,
              "same_weights": len({r["digest"] for r in rows.values()}) == 1,
              "speedup": round(rows["build_then_load"]["seconds"] / rows["meta"]["seconds"], 1)}
    print(f"same weights: {result['same_weights']}; build_then_load / meta: "
          f"{result['speedup']}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
