"""How faithful is distillation from a teacher cache? The bucket cache at several M and the
sampled cache at several S, against the live teacher, on the bundled demo.

    python benchmarks/cache_fidelity.py [--out DIR] [--seeds 0 1 2] [--skip-training]
                                        [--rows online top_m:48 sampled:12:32 ...]

A row is ``online`` (the live teacher), ``top_m:M`` (the bucket cache of M ids) or
``sampled:K:S`` (K ids kept exactly, S draws from the rest). For each:

1. bytes per position; on the demo teacher's held-out blocks (its validation split) and the
   demo student trained by online TAD, the relative error of the loss value,
   ``|cached - online| / online``, and of the gradient w.r.t. the student's logits,
   ``||g_cached - g_online|| / ||g_online||``, of TAD (K=10, beta=2) and forward KL, the cache
   encoded as stored (float16 log-probabilities); for a sampled cache, those of one cache and of
   the mean over 16 cache seeds (an unbiased cache's error falls as the seeds grow, a biased
   one's does not);
2. ``tune run tad_cache`` of the row, then ``python -m tad_torchtune.demo`` for KD and TAD over
   ``--seeds`` from it, with the same training tokens as online: the held-out KL (mean and
   sample standard deviation, measured by ``tad_eval`` with the live teacher) and the training
   tokens/s (median over the logged steps) against online's.

Writes ``DIR/cache_fidelity.json`` and ``DIR/cache_fidelity.png`` (held-out KL against bytes per
position, both kinds) and prints the table.
"""

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# the installed project where there is one (the GPU check installs its wheel: the checkout's
# tad_torchtune/ has no configs/ subpackage, which only an install maps), else this checkout
if importlib.util.find_spec("tad_torchtune") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tad_torchtune.data import collate, text_block_dataset  # noqa: E402
from tad_torchtune.demo import bundled_config, demo_tokenizer, tune_command  # noqa: E402
from tad_torchtune.losses import ForwardKLLoss, TADLoss  # noqa: E402
from tad_torchtune.losses.cached import teacher_sampled, teacher_top_m  # noqa: E402
from tad_torchtune.models import forward_hidden, load_hf_folder, project_logits  # noqa: E402
from tad_torchtune.teacher_cache import MODES, encode_round_trip  # noqa: E402

LOSSES = {"tad": lambda: TADLoss(k=10, beta=2.0), "kd": lambda: ForwardKLLoss()}
DEFAULT_ROWS = ["online", "top_m:28", "top_m:48", "sampled:12:8", "sampled:12:16",
                "sampled:12:32"]
ERROR_SEEDS = 16


def parse_row(row: str) -> dict:
    """``online``, ``top_m:M`` or ``sampled:K:S`` as the row's settings."""
    parts = row.split(":")
    if parts == ["online"]:
        return {"name": row, "mode": None}
    if parts[0] == "top_m" and len(parts) == 2:
        return {"name": row, "mode": "top_m", "top_m": int(parts[1])}
    if parts[0] == "sampled" and len(parts) == 3:
        return {"name": row, "mode": "sampled", "top_m": int(parts[1]), "samples": int(parts[2])}
    raise SystemExit(f"--rows: {row!r} is not online, top_m:M or sampled:K:S")


def bytes_per_position(row: dict, vocab: int = 2048) -> int:
    """What the cache stores per position (uint16 ids at the demo's vocabulary, float16
    log-probabilities, float32 scalars)."""
    if row["mode"] is None:
        return 0
    ids = 2 if vocab <= 2**16 else 4
    if row["mode"] == "top_m":
        return row["top_m"] * (ids + 2) + 8
    return row["top_m"] * (ids + 2) + 8 + row["samples"] * ids


def held_out_batch(max_blocks: int):
    from omegaconf import OmegaConf

    from tad_torchtune.schema import resolve_package_paths

    node = OmegaConf.create({k: v for k, v in bundled_config("demo")["validation_dataset"].items()
                             if k != "_component_"})
    resolve_package_paths(node)
    dataset = text_block_dataset(demo_tokenizer(), **OmegaConf.to_container(node))
    return collate([dataset[i] for i in range(min(max_blocks, len(dataset)))])


def loss_and_grad(fn, logits):
    s = logits.detach().clone().requires_grad_(True)
    value = fn(s)
    (grad,) = torch.autograd.grad(value, s)
    return float(value.detach()), grad


@torch.no_grad()
def _logits(model, tokens):
    return project_logits(model, forward_hidden(model, tokens)[0]).float()


def _load(folder):
    return load_hf_folder(folder, where="model", device=torch.device("cpu"), dtype=torch.float32)


def _cache_of(row: dict, t_logits, labels, seed: int):
    if row["mode"] == "top_m":
        return encode_round_trip(teacher_top_m(t_logits, labels, row["top_m"]), "float16")
    cache = teacher_sampled(t_logits, row["top_m"], row["samples"], seed=seed,
                            blocks=torch.arange(t_logits.shape[0]))
    return encode_round_trip(cache, "float16")


def errors(rows: list[dict], student: Path, max_blocks: int) -> list[dict]:
    """Part 1: loss and gradient errors of each cache against the live teacher."""
    from tad_torchtune.data import resolve_asset

    batch = held_out_batch(max_blocks)
    t_logits = _logits(_load(resolve_asset("pkg://demo/teacher")), batch.tokens)
    s_logits = _logits(_load(student), batch.tokens)
    out = []
    for row in rows:
        if row["mode"] is None:
            continue
        for loss_name, make in LOSSES.items():
            div = make()
            online, g_online = loss_and_grad(lambda s: div(s, t_logits, batch.labels), s_logits)
            seeds = range(ERROR_SEEDS if row["mode"] == "sampled" else 1)
            values, grads = [], []
            for seed in seeds:
                cache = _cache_of(row, t_logits, batch.labels, seed)
                v, g = loss_and_grad(lambda s: div(s, cache, batch.labels), s_logits)
                values.append(v)
                grads.append(g)
            mean_v, mean_g = statistics.fmean(values), torch.stack(grads).mean(0)

            def rel(v, g):
                return abs(v - online) / abs(online), float((g - g_online).norm() / g_online.norm())

            one_v, one_g = rel(values[0], grads[0])
            many_v, many_g = rel(mean_v, mean_g)
            out.append({"row": row["name"], "loss": loss_name, "online": online,
                        "value_rel_error": one_v, "grad_rel_error": one_g,
                        f"value_rel_error_mean_of_{len(values)}": many_v,
                        f"grad_rel_error_mean_of_{len(values)}": many_g,
                        "tokens": int((batch.labels != -100).sum())})
    return out


def _run(cmd: list[str], log: Path) -> float:
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}); log: {log}")
    return time.time() - start


def trained_student(out: Path) -> Path:
    """The demo student trained with online TAD (200 steps), part 1's student."""
    run = out / "trained_tad"
    if not (run / "student" / "config.json").is_file():
        _run([*tune_command(), "run", "tad_distill", "--config", "demo", f"output_dir={run}",
              "export_hf=true", "eval_every_n_steps=null", "save_every_n_steps=null"],
             out / "logs" / "trained_tad.log")
    return run / "student"


def _median_tps(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_second"] for r in rows if "tokens_per_second" in r)


def training(out: Path, row: dict, seeds: list[int]) -> dict:
    """Part 2 for one row: its cache, then KD and TAD over the seeds from it."""
    extra, result = [], {}
    if row["mode"] is not None:
        cache = out / "caches" / row["name"].replace(":", "_")
        settings = [f"cache_mode={row['mode']}", f"cache_top_m={row['top_m']}"]
        if row["mode"] == "sampled":
            settings.append(f"cache_samples={row['samples']}")
        result["cache_seconds"] = _run(
            [*tune_command(), "run", "tad_cache", "--config", "demo", f"teacher_cache_dir={cache}",
             f"output_dir={out / 'unused'}", *settings], out / "logs" / f"cache_{cache.name}.log")
        result["cache_bytes"] = sum(p.stat().st_size for p in cache.rglob("*.npy"))
        extra = [f"teacher_cache_dir={cache}"]
    demo_out = out / "demo" / row["name"].replace(":", "_")
    result["seconds"] = _run([sys.executable, "-m", "tad_torchtune.demo", "--out", str(demo_out),
                              "--seeds", *map(str, seeds), "--methods", "kd", "tad", *extra],
                             out / "logs" / f"demo_{demo_out.name}.log")
    report = json.loads((demo_out / "eval" / "eval.json").read_text())
    result["summary"] = json.loads((demo_out / "summary.json").read_text())
    result["per_seed_kl"] = {k: v["kl"] for k, v in report["students"].items()}
    result["tokens_per_second"] = {name: _median_tps(demo_out / name) for name in report["students"]}
    return result


def plot(results: dict, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, method in zip(axes, ("tad", "kd")):
        online = results.get("online", {}).get("summary", {}).get(method, {}).get("kl")
        if online:
            ax.axhline(online["mean"], color="black", lw=1, ls="--", label="online")
        for mode, marker in (("top_m", "s"), ("sampled", "o")):
            pts = [(bytes_per_position(r), results[r["name"]]["summary"][method]["kl"])
                   for r in rows if r["mode"] == mode and r["name"] in results]
            if pts:
                pts.sort()
                ax.errorbar([b for b, _ in pts], [k["mean"] for _, k in pts],
                            yerr=[k["std"] for _, k in pts], marker=marker, capsize=3,
                            label={"top_m": "top-M + bucket", "sampled": "top-K + draws"}[mode])
        ax.set_title(f"{'TAD (K=10, beta=2)' if method == 'tad' else 'forward KL'} student")
        ax.set_xlabel("bytes per position")
        ax.set_ylabel("held-out KL(teacher || student)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/cache_fidelity"))
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS)
    parser.add_argument("--blocks", type=int, default=64, help="held-out blocks of 128 tokens")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    rows = [parse_row(r) for r in args.rows]
    assert all(r["mode"] in (None, *MODES) for r in rows)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"rows": rows, "errors": errors(rows, trained_student(args.out), args.blocks)}
    print(f"{'row':<16}{'loss':<6}{'B/pos':>6}{'value err':>11}{'grad err':>10}"
          f"{'value err (mean)':>18}{'grad err (mean)':>17}")
    for e in report["errors"]:
        row = next(r for r in rows if r["name"] == e["row"])
        means = [v for k, v in e.items() if k.startswith(("value_rel_error_mean",
                                                          "grad_rel_error_mean"))]
        print(f"{e['row']:<16}{e['loss']:<6}{bytes_per_position(row):>6}{e['value_rel_error']:>11.2e}"
              f"{e['grad_rel_error']:>10.2e}{means[0]:>18.2e}{means[1]:>17.2e}")
    if not args.skip_training:
        report["training"] = {}
        for row in rows:
            report["training"][row["name"]] = training(args.out, row, args.seeds)
            (args.out / "cache_fidelity.json").write_text(json.dumps(report, indent=2) + "\n")
        t = report["training"]
        print(f"\n{'row':<16}{'B/pos':>6}{'TAD held-out KL':>24}{'vs online':>10}"
              f"{'KD held-out KL':>24}{'vs online':>10}{'TAD tok/s':>11}")
        for row in rows:
            cells = []
            for method in ("tad", "kd"):
                kl = t[row["name"]]["summary"][method]["kl"]
                on = t.get("online", {}).get("summary", {}).get(method, {}).get("kl")
                rel = f"{kl['mean'] / on['mean'] - 1:+.1%}" if on else ""
                cells.append(f"{kl['mean']:.4f} ± {kl['std']:.4f}".rjust(24) + rel.rjust(10))
            tps = statistics.median(v for k, v in t[row["name"]]["tokens_per_second"].items()
                                    if k.startswith("tad"))
            on_tps = statistics.median(v for k, v in t.get("online", t[row["name"]])
                                       ["tokens_per_second"].items() if k.startswith("tad"))
            print(f"{row['name']:<16}{bytes_per_position(row):>6}{''.join(cells)}"
                  f"{tps / on_tps:>10.2f}x")
        plot(t, rows, args.out / "cache_fidelity.png")
    (args.out / "cache_fidelity.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'cache_fidelity.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
