"""The Python steps of ``benchmarks/gpu_check.sh``: what is installed, and the summary.

    python benchmarks/gpu_check.py check-install [--require-cuda] [--require MODULE ...]
    python benchmarks/gpu_check.py summary OUT_DIR --steps STEPS.tsv --target-shape N,V,D,DTYPE
        [--dry-run]

``check-install`` prints the interpreter, the GPU and where each package the check needs is
imported from, and fails when one is missing or when the installed project (``tad_torchtune``,
its recipes and configs, as ``tune run`` subprocesses import them) differs from this checkout,
which the benchmarks import (a wheel built before the last edit).

``summary`` reads the check's files in OUT_DIR (``pytest_cuda*.xml``, ``loss_bench_*.json``,
``recipe_bench.json``) and the steps' exit codes, prints the targets as met or missed with their
figures, and writes everything to ``OUT_DIR/summary.json``. Exit code 1 when the check is
incomplete: a step failed or timed out, a test failed, a test was skipped on a GPU run (every
CUDA test must run there), or a target has no figure. A missed target is a result, not a
failure of the check: it is reported, and the exit code stays 0.
"""

import argparse
import importlib.metadata
import importlib.util
import json
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: gpu_check.sh's exit code for a step it did not start
NOT_RUN = 200

#: Qwen2.5-3B -> half depth, sequence 2048, bf16, fused head, compiled, on one H100/H200
#: (about 40% MFU there)
TARGET_RECIPE_TOKENS_PER_SECOND = 30_000
#: the recipe's fused TAD head (CE + TAD, ``fused_step``) against the four projection matmuls
TARGET_HEAD_OVER_FLOOR = 1.5
#: its peak memory beyond the student's gradients, at (8192, 256000, 3584) bf16
TARGET_HEAD_BEYOND_GRADIENTS_MIB = 2048.0

#: modules every run imports, with the distribution that holds each: torchtune imports HF
#: ``datasets`` (which needs pyarrow, fsspec and huggingface_hub of some versions), and
#: ``torchtune._cli.tune``, the ``tune`` command, every subcommand's dependencies (kagglehub)
REQUIRED = {"torch": "torch", "torchao": "torchao", "torchdata": "torchdata",
            "omegaconf": "omegaconf", "yaml": "PyYAML", "safetensors": "safetensors",
            "tqdm": "tqdm", "tokenizers": "tokenizers", "pyarrow": "pyarrow",
            "fsspec": "fsspec", "huggingface_hub": "huggingface_hub", "datasets": "datasets",
            "kagglehub": "kagglehub", "torchtune": "torchtune",
            "torchtune._cli.tune": "torchtune", "tad_torchtune": "tad_torchtune",
            "tad_distill": "tad_torchtune"}


# --------------------------------------------------------------------------- check-install


def installed_differences(root: Path = ROOT) -> list[str]:
    """Files of this checkout that the importable project lacks or holds otherwise: the package
    (``tad_torchtune/**.py``), the recipes (``recipes/*.py``, top-level modules) and the configs
    (``configs/*.yaml``, installed as ``tad_torchtune.configs``). Empty when they are the same
    files (an editable install) or the same bytes."""
    package = importlib.util.find_spec("tad_torchtune")
    if package is None or not package.submodule_search_locations:
        return ["tad_torchtune: not importable"]
    installed = Path(list(package.submodule_search_locations)[0])
    configs = Path(list(importlib.util.find_spec("tad_torchtune.configs")
                        .submodule_search_locations)[0])  # configs/ itself when editable
    pairs = [(f, installed / f.relative_to(root / "tad_torchtune"))
             for f in sorted((root / "tad_torchtune").rglob("*.py"))
             if "__pycache__" not in f.parts]
    pairs += [(f, configs / f.name) for f in sorted((root / "configs").glob("*"))
              if f.suffix in (".yaml", ".py")]
    for recipe in sorted((root / "recipes").glob("*.py")):
        spec = importlib.util.find_spec(recipe.stem)
        pairs.append((recipe, Path(spec.origin) if spec and spec.origin else None))
    return [str(ours.relative_to(root)) + (": missing" if there is None or not there.is_file()
                                           else ": differs")
            for ours, there in pairs
            if there is None or not there.is_file() or there.read_bytes() != ours.read_bytes()]


def check_install(require_cuda: bool, extra: list[str]) -> int:
    import torch

    print(f"python {sys.version.split()[0]} at {sys.executable}")
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: "
          f"{torch.cuda.get_device_name(0) if cuda else 'none'}")
    problems = []
    for module in [*REQUIRED, *extra]:  # imported: a missing dependency of theirs shows here
        try:
            origin = importlib.import_module(module).__file__
        except Exception as err:  # noqa: BLE001  (any import error is the answer)
            problems.append(f"{module}: import failed: {type(err).__name__}: {err}")
            continue
        dist = REQUIRED.get(module, module.split(".")[0].replace("_", "-"))
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        print(f"  {module:<26} {version:<14} {origin}")
    beside = Path(sys.executable).parent / "tune"
    tune = str(beside) if beside.is_file() else shutil.which("tune")
    print(f"  tune command: {tune}")
    if tune is None:
        problems.append("no `tune` command beside the interpreter or on PATH")
    if require_cuda and not cuda:
        problems.append("torch.cuda.is_available() is False: no GPU for a GPU check")
    if not any(p.startswith("tad_torchtune:") for p in problems):
        stale = installed_differences()
        if stale:
            problems.append("the installed project is not this checkout (rebuild its wheel: "
                            "pip wheel --no-deps -w .whl .): " + ", ".join(stale[:8])
                            + (f" and {len(stale) - 8} more" if len(stale) > 8 else ""))
    for p in problems:
        print(f"PROBLEM: {p}")
    return 1 if problems else 0


# --------------------------------------------------------------------------------- summary


def read_steps(path: Path) -> list[dict[str, Any]]:
    """``gpu_check.sh``'s step records: name, exit code, seconds, time limit (tab-separated);
    exit code 124 or 137 is ``timeout``'s (the step ran out of time), 200 the script's for a step
    it did not start (the time budget was spent)."""
    steps = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, rc, seconds, limit = line.split("\t")
        steps.append({"name": name, "rc": int(rc), "seconds": int(seconds),
                      "timeout_s": int(limit), "timed_out": int(rc) in (124, 137),
                      "not_run": int(rc) == NOT_RUN, "ok": int(rc) == 0})
    return steps


def step_state(step: dict[str, Any]) -> str:
    if step["ok"]:
        return "ok"
    if step["not_run"]:
        return "not run (time budget spent)"
    return f"timed out after {step['seconds']} s" if step["timed_out"] else f"exited {step['rc']}"


def read_junit(paths: list[Path]) -> dict[str, int] | None:
    """Counts of pytest JUnit XML files together: tests, failures, errors, skipped, passed
    (None without a file)."""
    if not paths:
        return None
    counts = {k: 0 for k in ("tests", "failures", "errors", "skipped")}
    for path in paths:
        root = ET.parse(path).getroot()
        for suite in [root] if root.tag == "testsuite" else root.iter("testsuite"):
            for k in counts:
                counts[k] += int(suite.get(k, 0))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def shape_key(row: dict[str, Any]) -> str:
    return f"{row['N']},{row['V']},{row['D']},{row['dtype']}"


def loss_figures(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per shape (``N,V,D,dtype``), the ratios the targets and the Liger comparison read off
    ``loss_bench.py``'s rows (paired time ratios, memory beyond the gradients; None where a case
    has no figure)."""
    from loss_bench import beyond_gradients, paired_time_ratio

    by_shape: dict[str, dict[tuple[str, str], dict]] = {}
    for r in rows:
        by_shape.setdefault(shape_key(r), {})[(r["impl"], r["divergence"])] = r

    def time_ratio(got, a, b):
        x, y = got.get(a), got.get(b)
        if not x or not y or x["ms"] is None or y["ms"] is None:
            return None
        return paired_time_ratio(x["times_ms"], y["times_ms"])

    def memory_ratio(got, a, b):
        x, y = got.get(a), got.get(b)
        if not x or not y or x["peak_mib"] is None or not (y["peak_mib"] or 0) > 0:
            return None
        return x["peak_mib"] / y["peak_mib"]

    def beyond(got, case):
        return beyond_gradients(got[case]) if case in got else None

    floor, head, head_bf16 = ("matmul_floor", "none"), ("fused_step", "tad"), (
        "fused_step_bf16_wgrad", "tad")
    tad, fkl, liger = ("fused", "tad"), ("fused", "forward_kl"), ("liger_fused_jsd", "forward_kl")
    out = {}
    for shape, got in by_shape.items():
        out[shape] = {
            "ms": {f"{i}/{d}": r["ms"] for (i, d), r in got.items()},
            "peak_mib": {f"{i}/{d}": r["peak_mib"] for (i, d), r in got.items()},
            "head_over_floor": time_ratio(got, head, floor),
            "head_beyond_gradients_mib": beyond(got, head),
            "head_bf16_wgrad_over_floor": time_ratio(got, head_bf16, floor),
            "head_bf16_wgrad_beyond_gradients_mib": beyond(got, head_bf16),
            "fused_tad_over_floor": time_ratio(got, tad, floor),
            "fused_tad_over_fused_forward_kl": time_ratio(got, tad, fkl),
            "liger_over_fused_forward_kl_time": time_ratio(got, liger, fkl),
            "liger_over_fused_forward_kl_memory": memory_ratio(got, liger, fkl),
            "notes": {f"{i}/{d}": r["note"] for (i, d), r in got.items() if r.get("note")},
        }
    return out


def target(name: str, value: float | None, limit: float, *, at_least: bool, unit: str,
           where: str, judged: bool, detail: str = "") -> dict[str, Any]:
    """One target: its figure against its limit; ``met`` is None when there is no figure or
    when the run does not judge (a dry run's tiny CPU shapes)."""
    met = None
    if value is not None and judged:
        met = value >= limit if at_least else value <= limit
    return {"name": name, "value": value, "limit": limit,
            "comparison": ">=" if at_least else "<=", "unit": unit, "where": where,
            "met": met, "detail": detail}


def summarize(out_dir: Path, steps: list[dict[str, Any]], target_shape: str,
              dry_run: bool) -> dict[str, Any]:
    rows = []
    for path in sorted(out_dir.glob("loss_bench_*.json")):
        rows += json.loads(path.read_text())
    loss = loss_figures(rows)
    recipe_path = out_dir / "recipe_bench.json"
    recipe_rows = json.loads(recipe_path.read_text())["rows"] if recipe_path.is_file() else []
    recipe = recipe_rows[0] if recipe_rows else None
    at = loss.get(target_shape, {})
    judged = not dry_run
    recipe_where = (f"{recipe['arch']} {recipe['variant']}, seq {recipe['seq']}, batch "
                    f"{recipe['batch']}, {recipe['device']}" if recipe else "no recipe_bench row")
    mfu = recipe.get("mfu") if recipe else None
    bf16_beyond = at.get("head_bf16_wgrad_beyond_gradients_mib")
    targets = [
        target("recipe tokens/s", recipe["recipe_tokens_per_second"] if recipe else None,
               TARGET_RECIPE_TOKENS_PER_SECOND, at_least=True, unit="tokens/s",
               where=recipe_where, judged=judged,
               detail=f"MFU {mfu:.1%} (about 40% expected)" if mfu is not None else "MFU unknown"),
        target("fused TAD head / matmul floor time", at.get("head_over_floor"),
               TARGET_HEAD_OVER_FLOOR, at_least=False, unit="x", where=target_shape,
               judged=judged, detail="fused_step/tad against matmul_floor, paired rounds"),
        target("fused TAD head memory beyond the gradients", at.get("head_beyond_gradients_mib"),
               TARGET_HEAD_BEYOND_GRADIENTS_MIB, at_least=False, unit="MiB",
               where=target_shape, judged=judged,
               detail="weight gradient summed in float32 (the default)" + (
                   f"; summed in the weight's dtype (fused_float32_weight_grad: false): "
                   f"{bf16_beyond:.0f} MiB" if bf16_beyond is not None else "")),
    ]
    tests = read_junit(sorted(out_dir.glob("pytest_cuda*.xml")))
    problems = [f"step {s['name']} {step_state(s)}" for s in steps if not s["ok"]]
    if tests is None:
        problems.append("no pytest_cuda*.xml")
    else:
        if tests["failures"] or tests["errors"]:
            problems.append(f"{tests['failures']} CUDA tests failed, {tests['errors']} errors")
        if not dry_run and tests["skipped"]:
            problems.append(f"{tests['skipped']} CUDA tests skipped on a GPU run")
    problems += [f"no figure for target: {t['name']}" for t in targets if t["value"] is None]
    return {"dry_run": dry_run, "environment": environment(), "steps": steps, "tests": tests,
            "loss": loss, "recipe": recipe, "targets": targets, "problems": problems,
            "complete": not problems}


def environment() -> dict[str, Any]:
    import torch

    versions = {}
    for dist in ("torch", "triton", "torchtune", "torchao", "torchdata", "omegaconf",
                 "liger-kernel", "tad_torchtune"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    cuda = torch.cuda.is_available()
    return {"python": sys.version.split()[0], "versions": versions,
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "cuda": torch.version.cuda}


def fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def print_summary(s: dict[str, Any]) -> None:
    env = s["environment"]
    dry = " (DRY RUN: CPU, tiny shapes, targets not judged)" if s["dry_run"] else ""
    print(f"\nGPU check summary{dry}: {env['gpu'] or 'no GPU'}, torch {env['versions']['torch']}, "
          f"liger-kernel {env['versions']['liger-kernel'] or 'not installed'}")
    print("steps: " + " | ".join(f"{st['name']} {step_state(st)} {st['seconds']} s"
                                 for st in s["steps"]))
    t = s["tests"]
    print("CUDA tests: " + ("no junit file" if t is None else
                            f"{t['passed']} passed, {t['failures']} failed, {t['errors']} errors, "
                            f"{t['skipped']} skipped"))
    for shape, f in s["loss"].items():
        print(f"loss ({shape}): fused TAD head / floor {fmt(f['head_over_floor'], '.2f')}, "
              f"beyond the gradients {fmt(f['head_beyond_gradients_mib'], '.0f')} MiB "
              f"(bf16 weight-gradient sum: {fmt(f['head_bf16_wgrad_over_floor'], '.2f')}, "
              f"{fmt(f['head_bf16_wgrad_beyond_gradients_mib'], '.0f')} MiB); fused TAD / floor "
              f"{fmt(f['fused_tad_over_floor'], '.2f')}; Liger JSD (forward KL) / our fused "
              f"forward KL: time {fmt(f['liger_over_fused_forward_kl_time'], '.2f')}, memory "
              f"{fmt(f['liger_over_fused_forward_kl_memory'], '.2f')}"
              + (f" ({f['notes']['liger_fused_jsd/forward_kl']})"
                 if "liger_fused_jsd/forward_kl" in f["notes"] else ""))
    for tg in s["targets"]:
        verdict = {True: "met", False: "MISSED",
                   None: "not judged" if s["dry_run"] else "no figure"}[tg["met"]]
        value = fmt(tg["value"], ".0f" if tg["unit"] != "x" else ".2f")
        print(f"- target {tg['name']} ({tg['where']}): {value} {tg['unit']} {tg['comparison']} "
              f"{tg['limit']:g}: {verdict}; {tg['detail']}")
    judged = [tg["met"] for tg in s["targets"] if tg["met"] is not None]
    print(f"targets: {judged.count(True)} met, {judged.count(False)} missed, "
          f"{len(s['targets']) - len(judged)} not judged")
    print("check complete" if s["complete"] else "CHECK INCOMPLETE: " + "; ".join(s["problems"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-install")
    check.add_argument("--require-cuda", action="store_true")
    check.add_argument("--require", nargs="*", default=[], metavar="MODULE",
                       help="further modules that must import (e.g. liger_kernel.chunked_loss)")
    summary = sub.add_parser("summary")
    summary.add_argument("out_dir", type=Path)
    summary.add_argument("--steps", type=Path, required=True)
    summary.add_argument("--target-shape", required=True, help="N,V,D,DTYPE of the loss targets")
    summary.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if args.command == "check-install":
        return check_install(args.require_cuda, args.require)
    s = summarize(args.out_dir, read_steps(args.steps), args.target_shape, args.dry_run)
    (args.out_dir / "summary.json").write_text(json.dumps(s, indent=1) + "\n")
    print_summary(s)
    return 0 if s["complete"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
