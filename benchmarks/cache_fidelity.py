"""How faithful is distillation from a teacher cache? Loss and gradient errors against the online
losses for several top-M, then the bundled demo trained from a cache against online training.

    python benchmarks/cache_fidelity.py [--out DIR] [--ms 8 16 32 64 128 256] [--seeds 0 1 2]
                                        [--top-m 48] [--skip-training]

1. Per M, on the demo teacher's held-out blocks (the demo's validation split) and two students
   (the demo student as ``tad_distill`` initialises it, and one trained by the demo recipe with
   online TAD): the relative error of the loss value, ``|cached - online| / online``, and of the
   gradient w.r.t. the student's logits, ``||g_cached - g_online|| / ||g_online||``, of cached
   TAD (K=10, beta=2; M >= K only) and cached forward KL; the cache encoded as stored (float16
   log-probabilities, and float32 to separate the encoding's share); bytes per position.
2. ``tune run tad_cache --config demo`` at ``--top-m``, then ``python -m tad_torchtune.demo`` for
   KD and TAD over ``--seeds``, online and from the cache (``teacher_cache_dir``), with the same
   tokens; held-out KL, CE and top-1 agreement measured exactly by ``tad_eval`` (the live teacher),
   mean and sample standard deviation; training tokens/s (median over the logged steps).

Writes ``DIR/cache_fidelity.json`` and prints the tables.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tad_torchtune.common import shift_labels  # noqa: E402
from tad_torchtune.data import collate_blocks, text_block_dataset  # noqa: E402
from tad_torchtune.demo import bundled_config, demo_tokenizer, tune_command  # noqa: E402
from tad_torchtune.losses import ForwardKLLoss, TADLoss  # noqa: E402
from tad_torchtune.losses.cached import teacher_top_m  # noqa: E402
from tad_torchtune.models import forward_hidden, project_logits  # noqa: E402
from tad_torchtune.teacher_cache import encode_round_trip  # noqa: E402

LOSSES = {"tad": lambda: TADLoss(k=10, beta=2.0, chunk_size=1024),
          "forward_kl": lambda: ForwardKLLoss(chunk_size=1024)}


def _load(folder: str | Path):
    from omegaconf import OmegaConf

    import tad_eval

    return tad_eval.load_hf_model(OmegaConf.create({"checkpoint_dir": str(folder)}), where="model",
                                  device=torch.device("cpu"), dtype=torch.float32)


def held_out_batches(max_blocks: int):
    cfg = bundled_config("demo")["validation_dataset"]
    kwargs = {k: v for k, v in cfg.items() if k != "_component_"}
    kwargs["source"] = kwargs["source"]
    from tad_torchtune.config_checks import resolve_package_paths
    from omegaconf import OmegaConf

    node = OmegaConf.create(kwargs)
    resolve_package_paths(node)
    dataset = text_block_dataset(demo_tokenizer(), **OmegaConf.to_container(node))
    n = min(max_blocks, len(dataset))
    batch = collate_blocks([dataset[i] for i in range(n)])
    return batch["tokens"], shift_labels(batch["labels"])


def loss_and_grad(fn, logits):
    s = logits.detach().clone().requires_grad_(True)
    value = fn(s)
    (grad,) = torch.autograd.grad(value, s)
    return float(value.detach()), grad


@torch.no_grad()
def _logits(model, tokens):
    return project_logits(model, forward_hidden(model, tokens)[0]).float()


def fidelity(students: dict[str, Path | None], ms: list[int], max_blocks: int) -> list[dict]:
    """Part 1: the rows of the loss / gradient error table."""
    from tad_torchtune.data import resolve_asset

    teacher = _load(resolve_asset("pkg://demo/teacher"))
    tokens, labels = held_out_batches(max_blocks)
    t_logits = _logits(teacher, tokens)
    rows = []
    for student_name, folder in students.items():
        s_logits = _logits(_load(folder), tokens)
        for loss_name, make in LOSSES.items():
            div = make()
            online, g_online = loss_and_grad(lambda s: div(s, t_logits, labels), s_logits)
            for m in ms:
                if m < getattr(div, "k", 0):  # TAD from a cache needs K <= M
                    continue
                exact = teacher_top_m(t_logits, labels, m)
                for encoding in ("float16", "float32"):
                    cache = exact if encoding == "float32" else encode_round_trip(exact, encoding)
                    value, grad = loss_and_grad(
                        lambda s: div.sum_and_count_cached(s, cache, labels).mean(), s_logits)
                    rows.append({
                        "student": student_name, "loss": loss_name, "M": m,
                        "logp_dtype": encoding, "online": online, "cached": value,
                        "value_rel_error": abs(value - online) / abs(online),
                        "grad_rel_error": float((grad - g_online).norm() / g_online.norm()),
                        "bytes_per_token": m * (2 + (2 if encoding == "float16" else 4)) + 8,
                        "tokens": int((labels != -100).sum()),
                    })
    return rows


def _run(cmd: list[str], log: Path) -> float:
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}); log: {log}")
    return time.time() - start


def train_student(out: Path) -> Path:
    """A demo student trained with online TAD (200 steps), for part 1's second student."""
    run = out / "trained_tad"
    if not (run / "student" / "config.json").is_file():
        _run([*tune_command(), "run", "tad_distill", "--config", "demo", f"output_dir={run}",
              "export_hf=true", "eval_every_n_steps=null", "save_every_n_steps=null"],
             out / "logs" / "trained_tad.log")
    return run / "student"


def initial_student(out: Path) -> Path:
    """The demo student as tad_distill initialises it (one step at learning rate 0)."""
    run = out / "initial"
    if not (run / "student" / "config.json").is_file():
        _run([*tune_command(), "run", "tad_distill", "--config", "demo", f"output_dir={run}",
              "export_hf=true", "max_steps=1", "optimizer.lr=0.0", "eval_every_n_steps=null",
              "lr_scheduler=null", "save_every_n_steps=null", "validation_dataset=null"],
             out / "logs" / "initial.log")
    return run / "student"


def _median_tps(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_second"] for r in rows if "tokens_per_second" in r)


def training(out: Path, seeds: list[int], top_m: int) -> dict:
    """Part 2: the demo, online and from a cache of ``top_m``."""
    cache = out / f"demo_cache_m{top_m}"
    cache_seconds = _run([*tune_command(), "run", "tad_cache", "--config", "demo",
                          f"teacher_cache_dir={cache}", f"cache_top_m={top_m}",
                          f"output_dir={out / 'unused'}"], out / "logs" / "tad_cache.log")
    result = {"top_m": top_m, "cache_seconds": cache_seconds,
              "cache_bytes": sum(p.stat().st_size for p in cache.rglob("*.npy"))}
    seeds_arg = ["--seeds", *map(str, seeds), "--methods", "kd", "tad"]
    for mode, extra in (("online", []), ("cached", [f"teacher_cache_dir={cache}"])):
        demo_out = out / f"demo_{mode}"
        seconds = _run([sys.executable, "-m", "tad_torchtune.demo", "--out", str(demo_out),
                        *seeds_arg, *extra], out / "logs" / f"demo_{mode}.log")
        summary = json.loads((demo_out / "summary.json").read_text())
        report = json.loads((demo_out / "eval" / "eval.json").read_text())
        tps = {name: _median_tps(demo_out / name) for name in report["students"]}
        result[mode] = {"seconds": seconds, "summary": summary,
                        "per_seed": {k: v["kl"] for k, v in report["students"].items()},
                        "tokens_per_second": tps}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/cache_fidelity"))
    parser.add_argument("--ms", type=int, nargs="+", default=[8, 16, 32, 48, 64, 128, 256])
    parser.add_argument("--blocks", type=int, default=64, help="held-out blocks of 128 tokens")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--top-m", type=int, default=48, help="M of the training comparison")
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    students = {"initial": initial_student(args.out), "trained_tad": train_student(args.out)}
    rows = fidelity(students, args.ms, args.blocks)
    print(f"{'student':<12}{'loss':<11}{'M':>5}{'logp':>9}{'B/token':>9}"
          f"{'value err':>11}{'grad err':>11}")
    for r in rows:
        print(f"{r['student']:<12}{r['loss']:<11}{r['M']:>5}{r['logp_dtype']:>9}"
              f"{r['bytes_per_token']:>9}{r['value_rel_error']:>11.2e}{r['grad_rel_error']:>11.2e}")
    out = {"fidelity": rows}
    if not args.skip_training:
        out["training"] = training(args.out, args.seeds, args.top_m)
        t = out["training"]
        for method in ("kd", "tad"):
            on, ca = t["online"]["summary"][method]["kl"], t["cached"]["summary"][method]["kl"]
            tps_on = statistics.median(v for k, v in t["online"]["tokens_per_second"].items()
                                       if k.startswith(method))
            tps_ca = statistics.median(v for k, v in t["cached"]["tokens_per_second"].items()
                                       if k.startswith(method))
            print(f"{method}: held-out KL online {on['mean']:.4f} ± {on['std']:.4f}, "
                  f"cached {ca['mean']:.4f} ± {ca['std']:.4f} ({ca['mean'] / on['mean'] - 1:+.2%});"
                  f" tokens/s online {tps_on:.0f}, cached {tps_ca:.0f} ({tps_ca / tps_on:.2f}x)")
    (args.out / "cache_fidelity.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out / 'cache_fidelity.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
