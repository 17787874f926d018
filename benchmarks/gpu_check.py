"""The Python steps of ``benchmarks/gpu_check.sh``: what is installed, and the summary.

    python benchmarks/gpu_check.py check-install [--require-cuda] [--require MODULE ...]
    python benchmarks/gpu_check.py summary OUT_DIR --steps STEPS.tsv --loss-shapes S1 S2
        --recipe-archs A1 A2 [--dry-run]

``check-install`` prints the interpreter, the GPU and where each package the check needs is
imported from, and fails when one is missing or when the installed project (``tad_torchtune``,
its recipes and configs, as ``tune run`` subprocesses import them) differs from this checkout,
which the benchmarks import (a wheel built before the last edit).

``summary`` reads the check's files in OUT_DIR (``pytest_cuda*.xml``, ``loss_bench.json``,
``recipe_bench_*.json``) and the steps' exit codes, prints the targets (``LOSS_TARGETS`` at each
of ``LOSS_TARGET_SHAPES``, ``RECIPE_TARGETS``) as met or missed with their figures, and writes
everything to ``OUT_DIR/summary.json``. ``--loss-shapes`` and ``--recipe-archs`` name what was
measured for each target shape and architecture, in their order: the targets themselves on a
GPU, tiny stand-ins in a dry run, whose targets keep their names and are not judged. Exit code 1
when the check is incomplete: a step failed or timed out, a test failed, a test was skipped on a
GPU run (every CUDA test must run there), a target has no figure, or a GPU target's figure came
from a stand-in. A missed target is a result, not a failure of the check: it is reported, and
the exit code stays 0.
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

#: the loss head's target shapes (N, V, D, dtype): Qwen2.5's vocabulary and width (the
#: Qwen2.5-3B pair), Gemma2-9B's
LOSS_TARGET_SHAPES = ("8192,151936,2048,bf16", "8192,256000,3584,bf16")
#: loss_bench cases the targets read: the recipe's head (CE + divergence at its settings),
#: Liger's fused linear JSD with its CE (CE + forward KL), the unchunked four-matmul floor
HEAD_TAD, HEAD_FKL = "fused_step_recipe/tad", "fused_step_recipe/forward_kl"
LIGER, FLOOR = "liger_fused_jsd_ce/forward_kl", "matmul_floor_unchunked/none"
#: (name, case, against, what, limit): the case's paired time ratio ("ms") or peak-memory
#: ratio ("peak_mib") against the other case, at most ``limit`` (issue 19)
LOSS_TARGETS = (
    ("vs Liger time", HEAD_TAD, LIGER, "ms", 1.15),
    ("vs Liger memory", HEAD_TAD, LIGER, "peak_mib", 1.0),
    ("CE + forward KL vs Liger time", HEAD_FKL, LIGER, "ms", 1.0),
    ("unchunked floor", HEAD_TAD, FLOOR, "ms", 1.5),
)
#: the recipe head's variants that check the GPU configs' head settings (issue 19, item 5; not
#: targets): TAD with the schema's default teacher cache (which projects the teacher twice at
#: these vocabularies), with a cache of one chunk's projections (half of a 2048-token row
#: projected twice), with the float32 weight-gradient sum (these in the loss step), and at
#: half and twice loss_chunk_size (the optional loss_chunk step, beside a recipe head of its
#: own); each read against the recipe's head (the configs' settings) and against Liger
HEAD_VARIANTS = ("fused_step_recipe_default_cache/tad", "fused_step_recipe_chunk_cache/tad",
                 "fused_step_recipe_fp32_wgrad/tad", "fused_step_recipe_half_chunk/tad",
                 "fused_step_recipe_double_chunk/tad")
#: the loss_chunk step's variants, as the summary names them
CHUNK_VARIANTS = {"fused_step_recipe_half_chunk/tad": "half loss_chunk_size",
                  "fused_step_recipe_double_chunk/tad": "twice loss_chunk_size"}
#: per target architecture, (name, figure of its recipe_bench row, at least): the recipe's speed
#: over the compiled transformers + Liger loop's (paired rounds), and its MFU
RECIPE_TARGETS = {
    "qwen2_5_3b_half": (("vs transformers + Liger", "recipe_over_peer", 1.10),
                        ("MFU", "mfu", 0.50)),
    "gemma2_9b_third_short": (("vs transformers + Liger", "recipe_over_peer", 1.05),),
}

#: modules every run imports, with the distribution that holds each: torchtune imports HF
#: ``datasets`` (which needs pyarrow, fsspec and huggingface_hub of some versions), and
#: ``torchtune._cli.tune``, the ``tune`` command, every subcommand's dependencies (kagglehub);
#: transformers for recipe_bench's peer loop
REQUIRED = {"torch": "torch", "torchao": "torchao", "torchdata": "torchdata",
            "omegaconf": "omegaconf", "yaml": "PyYAML", "safetensors": "safetensors",
            "tqdm": "tqdm", "tokenizers": "tokenizers", "pyarrow": "pyarrow",
            "fsspec": "fsspec", "huggingface_hub": "huggingface_hub", "datasets": "datasets",
            "kagglehub": "kagglehub", "torchtune": "torchtune",
            "torchtune._cli.tune": "torchtune", "transformers": "transformers",
            "tad_torchtune": "tad_torchtune", "tad_distill": "tad_torchtune"}


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
    """``gpu_check.sh``'s step records: name, exit code, seconds, time limit and whether the
    step is optional (1: measured in the time left, not for a target; tab-separated); exit
    code 124 or 137 is ``timeout``'s (the step ran out of time), 200 the script's for a step it
    did not start (the time budget was spent)."""
    steps = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, rc, seconds, limit, optional = line.split("\t")
        steps.append({"name": name, "rc": int(rc), "seconds": int(seconds),
                      "timeout_s": int(limit), "timed_out": int(rc) in (124, 137),
                      "not_run": int(rc) == NOT_RUN, "ok": int(rc) == 0,
                      "optional": optional == "1"})
    return steps


def step_problem(step: dict[str, Any]) -> bool:
    """Whether a step's record makes the check incomplete: any step that did not succeed,
    except an optional one that was not run or ran out of the time left (a failure of its
    own still counts)."""
    if step["ok"]:
        return False
    return not (step["optional"] and (step["not_run"] or step["timed_out"]))


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
    """Per shape (``N,V,D,dtype``) of ``loss_bench.py``'s rows: each case's median time, peak
    memory, note and whether a stand-in ran it; and every target's ratio (None where a case has
    no figure)."""
    from loss_bench import paired_time_ratio

    by_shape: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_shape.setdefault(shape_key(r), {})[f"{r['impl']}/{r['divergence']}"] = r

    def ratio(got, a, b, what):
        x, y = got.get(a), got.get(b)
        if not x or not y or x[what] is None or not (y[what] or 0) > 0:
            return None
        if what == "ms":
            return paired_time_ratio(x["times_ms"], y["times_ms"])
        return x[what] / y[what]

    return {shape: {
        "row_tokens": sorted({r.get("row_tokens") for r in got.values()} - {None}),
        "ms": {c: r["ms"] for c, r in got.items()},
        "peak_mib": {c: r["peak_mib"] for c, r in got.items()},
        "notes": {c: r["note"] for c, r in got.items() if r.get("note")},
        "stand_in": sorted(c for c, r in got.items() if r.get("stand_in")),
        "profiles": {c: r["profile"] for c, r in got.items() if "profile" in r},
        "ratios": {name: ratio(got, case, against, what)
                   for name, case, against, what, _ in LOSS_TARGETS},
        "variants": {case: {"time_vs_recipe": ratio(got, case, HEAD_TAD, "ms"),
                            "memory_vs_recipe": ratio(got, case, HEAD_TAD, "peak_mib"),
                            "time_vs_liger": ratio(got, case, LIGER, "ms"),
                            "memory_vs_liger": ratio(got, case, LIGER, "peak_mib")}
                     for case in HEAD_VARIANTS if case in got},
    } for shape, got in by_shape.items()}


def _profiled(profile: dict[str, Any] | None) -> bool:
    return bool(profile) and "error" not in profile


def _gap(mine: dict[str, Any], mine_ms: float, theirs: dict[str, Any],
         theirs_ms: float) -> dict[str, Any]:
    """One profiled step against another: the difference of their median step times
    (``step_ms``), of the device's idle time in a step (``idle_ms``: the median step time less
    the profiled busy time) and of each kind's kernel time (``kinds_ms``)."""
    return {"step_ms": mine_ms - theirs_ms,
            "idle_ms": (mine_ms - mine["busy_ms"]) - (theirs_ms - theirs["busy_ms"]),
            "kinds_ms": {k: v - theirs["kinds_ms"].get(k, 0.0)
                         for k, v in mine["kinds_ms"].items()}}


def profile_gaps(loss: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per loss shape, where the recipe's heads' time differs from Liger's, from the profiled
    steps (``loss_bench.py --profile``): for each of ``HEAD_TAD`` and ``HEAD_FKL``, ``_gap``
    against ``LIGER``, and the head's matmul time against the unchunked floor's
    (``matmul_vs_floor``: what chunking and the head's layout cost the products). Not a target:
    the reading of a missed time target. Shapes or cases without a profile are left out."""
    out: dict[str, dict[str, Any]] = {}
    for shape, f in loss.items():
        profiles, ms = f.get("profiles", {}), f["ms"]
        liger = profiles.get(LIGER)
        floor_matmul = (profiles.get(FLOOR) or {}).get("kinds_ms", {}).get("matmul")
        for head in (HEAD_TAD, HEAD_FKL):
            mine = profiles.get(head)
            if not _profiled(mine) or ms.get(head) is None:
                continue
            got: dict[str, Any] = {"matmul_vs_floor": mine["kinds_ms"]["matmul"] / floor_matmul
                                   if floor_matmul else None}
            if _profiled(liger) and ms.get(LIGER) is not None:
                got.update(against=LIGER, **_gap(mine, ms[head], liger, ms[LIGER]))
            out.setdefault(shape, {})[head] = got
    return out


def recipe_gaps(recipes: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per recipe_bench architecture, where the recipe's step time differs from the compiled
    peer's (transformers + Liger), from their profiled steps (``recipe_bench.py --profile``):
    ``_gap``, and the difference of their kernel counts. Not a target: the reading of the
    end-to-end ratio. Architectures without both profiles are left out."""
    out = {}
    for arch, row in recipes.items():
        profiles, loops = row.get("profiles", {}), row["loops"]
        mine, peer = profiles.get("recipe"), profiles.get("peer")
        if not _profiled(mine) or not _profiled(peer) or "peer" not in loops:
            continue
        ms = {name: 1e3 * loops[name]["step_seconds"] for name in ("recipe", "peer")}
        out[arch] = {"against": "peer", "kernels": mine["kernels"] - peer["kernels"],
                     **_gap(mine, ms["recipe"], peer, ms["peer"])}
    return out


def _signed_kinds(kinds_ms: dict[str, float]) -> str:
    """A ``_gap``'s kinds, the largest difference first, those under 0.05 ms left out."""
    ranked = sorted(kinds_ms.items(), key=lambda kv: -abs(kv[1]))
    return ", ".join(f"{k} {v:+.1f}" for k, v in ranked if abs(v) >= 0.05) or "the same"


#: rows per chunk of the loss cases whose code ``head_code`` reads (the recipe's head's
#: ``loss_chunk_size``, Liger's default chunk)
CODE_CHUNK = 1024


def head_code(folder: Path) -> dict[str, Any]:
    """The code inductor generated for each loss case (``loss_bench.py --inductor-code``, files
    ``NxVxD__IMPL__DIVERGENCE__K.py``), read by ``head_kernels.graph_traffic`` and summed per
    shape and case as one chunk of ``CODE_CHUNK`` rows runs it (``head_kernels.kernel_totals``:
    kernels, loops over a row, ``[chunk, V]`` passes; every graph of the case counted once): the
    GPU's own figures for what ``head_kernels.py --backend triton`` predicts on a CPU. Not a
    target: a file that cannot be read is named in ``errors``, the check goes on."""
    from head_kernels import graph_traffic, kernel_totals

    cases: dict[tuple[str, str], list] = {}
    errors = []
    for path in sorted(folder.glob("*.py")) if folder.is_dir() else ():
        parts = path.stem.split("__")
        try:
            n, v, d = parts[0].split("x")
            kernels = graph_traffic(path.read_text(), CODE_CHUNK)
        except Exception as err:  # noqa: BLE001  (a format this reading does not know)
            errors.append(f"{path.name}: {type(err).__name__}: {err}"[:300])
            continue
        key = (f"{n},{v},{d}", "/".join(parts[1:3]))
        cases.setdefault(key, [0, []])
        cases[key][0] += 1
        cases[key][1] += kernels
    out: dict[str, Any] = {"chunk": CODE_CHUNK, "errors": errors, "shapes": {}}
    for (shape, case), (graphs, kernels) in sorted(cases.items()):
        vocab = int(shape.split(",")[1])
        out["shapes"].setdefault(shape, {})[case] = {
            "graphs": graphs, **kernel_totals(kernels, CODE_CHUNK, vocab)}
    return out


def case_settings(case: str, shape: str) -> dict[str, Any]:
    """The GPU configs' keys a recipe head case sets otherwise than the configs (``{}`` for the
    recipe's head itself), from ``loss_bench.FUSED_OPTIONS``: a cache of one chunk as its MiB at
    ``shape`` (``N,V,D,dtype``; ``fused.teacher_projection_bytes``, as ``loss_bench`` sizes
    that case)."""
    import torch
    from loss_bench import DTYPES, FUSED_OPTIONS, HEAD_KEYS, ONE_CHUNK, RECIPE_HEAD, parse_shape

    from tad_torchtune.losses.fused import teacher_projection_bytes

    options = FUSED_OPTIONS.get(case.split("/")[0], {})
    keys = {option: key for key, option in HEAD_KEYS.items()}
    out = {}
    for option, value in options.items():
        if option in keys and value != RECIPE_HEAD.get(option):
            if value == ONE_CHUNK:
                _, vocab, _, dtype = parse_shape(shape)
                meta = torch.empty(vocab, 0, dtype=DTYPES[dtype], device="meta")
                value = teacher_projection_bytes(options["chunk_size"], meta, meta) / 2**20
            out[keys[option]] = value
    return out


def head_choice(loss: dict[str, dict], chunk: dict[str, dict]) -> dict[str, Any]:
    """Issue 19, item 5, per loss shape: among the recipe's head (CE + TAD at the GPU configs'
    settings) and its variants (the loss step's and the loss_chunk step's), the fastest whose
    peak memory is within Liger's (time: paired against the recipe's head in the step that ran
    the variant; memory: against Liger's in the loss step), with the configs' keys it sets; None
    where no case has both figures within Liger's memory. Not a target: what the configs'
    defaults should be."""
    out: dict[str, Any] = {}
    for shape, f in loss.items():
        figures = {HEAD_TAD: (1.0 if f["ms"].get(HEAD_TAD) is not None else None,
                              f["ratios"].get("vs Liger memory"))}
        for case, x in f.get("variants", {}).items():
            figures[case] = (x["time_vs_recipe"], x["memory_vs_liger"])
        c = chunk.get(shape, {})
        for case, x in c.get("variants", {}).items():
            figures[case] = (x["time_vs_recipe"], c["memory_vs_liger"].get(case))
        within = {case: x for case, x in figures.items()
                  if None not in x and x[1] <= 1.0}
        best = min(within, key=lambda case: within[case][0]) if within else None
        out[shape] = None if best is None else {
            "case": best, "settings": case_settings(best, shape),
            "time_vs_recipe": within[best][0], "memory_vs_liger": within[best][1]}
    return out


def target(name: str, value: float | None, limit: float, *, at_least: bool, unit: str,
           where: str, judged: bool, stand_in: bool = False, detail: str = "") -> dict[str, Any]:
    """One target: its figure against its limit; ``met`` is None when there is no figure, when
    the run does not judge (a dry run's tiny CPU shapes) or when a stand-in made the figure."""
    met = None
    if value is not None and judged and not stand_in:
        met = value >= limit if at_least else value <= limit
    return {"name": name, "value": value, "limit": limit,
            "comparison": ">=" if at_least else "<=", "unit": unit, "where": where,
            "met": met, "stand_in": stand_in, "detail": detail}


def targets_of(loss: dict[str, dict], recipes: dict[str, dict], loss_shapes: list[str],
               recipe_archs: list[str], dry_run: bool) -> list[dict[str, Any]]:
    """Every target of ``LOSS_TARGETS`` at each of ``LOSS_TARGET_SHAPES`` and of
    ``RECIPE_TARGETS``, its figure read at the shape or architecture measured for it (the same
    on a GPU; the dry run's stand-ins, in the same order)."""
    out = []
    stand = " (dry run)" if dry_run else ""
    for gpu_shape, shape in zip(LOSS_TARGET_SHAPES, loss_shapes):
        got = loss.get(shape, {})
        for name, case, against, what, limit in LOSS_TARGETS:
            value = got.get("ratios", {}).get(name)
            out.append(target(
                f"{name} ({gpu_shape})", value, limit, at_least=False, unit="x",
                where=shape + stand, judged=not dry_run,
                stand_in=bool({case, against} & set(got.get("stand_in", ()))),
                detail=f"{case} / {against}, "
                       + ("paired rounds" if what == "ms" else "peak extra memory")))
    for gpu_arch, arch in zip(RECIPE_TARGETS, recipe_archs):
        row = recipes.get(arch)
        where = (f"{arch} {row['variant']}, seq {row['seq']}, batch {row['batch']}, "
                 f"{row['device']}{stand}" if row else f"no recipe_bench row for {arch}")
        peer = (row or {}).get("peer", {})
        for name, key, limit in RECIPE_TARGETS[gpu_arch]:
            loops = (row or {}).get("loops", {})
            value = (loops.get("recipe", {}).get("mfu") if key == "mfu"
                     else (row or {}).get(key))
            detail = (f"recipe {loops['recipe']['tokens_per_second']:.0f} tokens/s, compiled "
                      f"peer {loops['peer']['tokens_per_second']:.0f} ({peer.get('loss')}, "
                      f"transformers {peer.get('transformers')}, {peer.get('attention')})"
                      if "recipe" in loops and "peer" in loops else "")
            out.append(target(f"{name} ({gpu_arch})", value, limit, at_least=True,
                              unit="x" if key != "mfu" else "", where=where,
                              judged=not dry_run, detail=detail,
                              stand_in=key != "mfu" and "LigerStandIn" in str(peer.get("loss"))))
    return out


def summarize(out_dir: Path, steps: list[dict[str, Any]], loss_shapes: list[str],
              recipe_archs: list[str], dry_run: bool) -> dict[str, Any]:
    rows = []
    for path in sorted(out_dir.glob("loss_bench*.json")):
        rows += json.loads(path.read_text())
    loss = loss_figures(rows)
    chunk_file = out_dir / "loss_chunk.json"
    chunk = {shape: {k: f[k] for k in ("row_tokens", "ms", "peak_mib", "notes", "variants")}
             for shape, f in
             loss_figures(json.loads(chunk_file.read_text()) if chunk_file.is_file()
                          else []).items()}
    for shape, f in chunk.items():  # Liger's memory has no rows: the loss step's, same N, V, D
        liger = loss.get(shape, {}).get("peak_mib", {}).get(LIGER)
        f["memory_vs_liger"] = {c: m / liger if m is not None and liger else None
                                for c, m in f["peak_mib"].items()}
    recipes = {}
    for path in sorted(out_dir.glob("recipe_bench*.json")):
        for row in json.loads(path.read_text())["rows"]:
            recipes[row["arch"]] = row
    targets = targets_of(loss, recipes, loss_shapes, recipe_archs, dry_run)
    tests = read_junit(sorted(out_dir.glob("pytest_cuda*.xml")))
    problems = [f"step {s['name']} {step_state(s)}" for s in steps if step_problem(s)]
    if tests is None:
        problems.append("no pytest_cuda*.xml")
    else:
        if tests["failures"] or tests["errors"]:
            problems.append(f"{tests['failures']} CUDA tests failed, {tests['errors']} errors")
        if not dry_run and tests["skipped"]:
            problems.append(f"{tests['skipped']} CUDA tests skipped on a GPU run")
    problems += [f"no figure for target: {t['name']}" for t in targets if t["value"] is None]
    if not dry_run:
        problems += [f"target {t['name']} measured on a stand-in" for t in targets
                     if t["stand_in"]]
    from loss_bench import RECIPE_CONFIG, RECIPE_HEAD

    return {"dry_run": dry_run, "environment": environment(), "steps": steps, "tests": tests,
            "recipe_head": {"config": RECIPE_CONFIG.stem, "options": RECIPE_HEAD},
            "loss": loss, "chunk": chunk, "head_choice": head_choice(loss, chunk),
            "profile_gaps": profile_gaps(loss), "recipe_gaps": recipe_gaps(recipes),
            "head_code": head_code(out_dir / "inductor_code"),
            "recipes": recipes, "targets": targets, "problems": problems,
            "complete": not problems}


def environment() -> dict[str, Any]:
    import torch

    versions = {}
    for dist in ("torch", "triton", "torchtune", "torchao", "torchdata", "omegaconf",
                 "transformers", "liger-kernel", "tad_torchtune"):
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
    from step_profile import describe

    env = s["environment"]
    dry = " (DRY RUN: CPU, tiny shapes, targets not judged)" if s["dry_run"] else ""
    print(f"\nGPU check summary{dry}: {env['gpu'] or 'no GPU'}, torch {env['versions']['torch']}, "
          f"liger-kernel {env['versions']['liger-kernel'] or 'not installed'}, transformers "
          f"{env['versions']['transformers'] or 'not installed'}")
    print("steps: " + " | ".join(f"{st['name']} {step_state(st)} {st['seconds']} s"
                                 for st in s["steps"]))
    head = s["recipe_head"]
    print(f"the recipe's head (fused_step_recipe): {head['config']}'s settings, "
          + ", ".join(f"{k} {v}" for k, v in head["options"].items()))
    t = s["tests"]
    print("CUDA tests: " + ("no junit file" if t is None else
                            f"{t['passed']} passed, {t['failures']} failed, {t['errors']} errors, "
                            f"{t['skipped']} skipped"))
    for shape, f in s["loss"].items():
        cases = ", ".join(f"{c} {fmt(ms, '.1f')} ms {fmt(f['peak_mib'][c], '.0f')} MiB"
                          for c, ms in f["ms"].items())
        rows = "/".join(map(str, f["row_tokens"])) or "?"
        print(f"loss ({shape}, rows of {rows} tokens): {cases}"
              + (f"; stand-ins: {', '.join(f['stand_in'])}" if f["stand_in"] else "")
              + "".join(f"; {c}: {n}" for c, n in f["notes"].items()))
    for shape, f in s["loss"].items():
        if f.get("variants"):
            print(f"recipe head variants ({shape}; the GPU configs' choices, not targets): "
                  + "; ".join(f"{c}: time {fmt(x['time_vs_recipe'], '.2f')}x, peak memory "
                              f"{fmt(x['memory_vs_recipe'], '.2f')}x the recipe head's, "
                              f"{fmt(x['time_vs_liger'], '.2f')}x and "
                              f"{fmt(x['memory_vs_liger'], '.2f')}x Liger's"
                              for c, x in f["variants"].items()))
    for shape, f in s["chunk"].items():
        cases = ", ".join(f"{c} {fmt(ms, '.1f')} ms {fmt(f['peak_mib'][c], '.0f')} MiB"
                          for c, ms in f["ms"].items())
        rows = "/".join(map(str, f["row_tokens"])) or "?"
        print(f"loss_chunk ({shape}, rows of {rows} tokens): {cases}; peak memory against "
              f"Liger's (the loss step's): " + ", ".join(
                  f"{c} {fmt(x, '.2f')}x" for c, x in f["memory_vs_liger"].items())
              + "".join(f"; {c}: {n}" for c, n in f["notes"].items()))
        for c, x in f["variants"].items():
            print(f"recipe head at {CHUNK_VARIANTS.get(c, c)} ({shape}; {c}, step loss_chunk, "
                  f"not a target): time {fmt(x['time_vs_recipe'], '.2f')}x, peak memory "
                  f"{fmt(x['memory_vs_recipe'], '.2f')}x the recipe head's in the same process")
    if not s["chunk"]:
        print("recipe head at half and twice loss_chunk_size: not measured (step loss_chunk)")
    for shape, x in s["head_choice"].items():
        print(f"item 5 ({shape}; not a target): " + (
            "no CE + TAD head measured within Liger's memory" if x is None else
            f"the fastest CE + TAD head within Liger's memory is {x['case']}, time "
            f"{x['time_vs_recipe']:.2f}x the recipe head's, memory {x['memory_vs_liger']:.2f}x "
            f"Liger's; the GPU configs' "
            + ("settings as they are" if not x["settings"] else "settings with " + ", ".join(
                f"{k}: {v:.0f}" if isinstance(v, float) else f"{k}: {v}"
                for k, v in x["settings"].items()))))
    code = s["head_code"]
    for shape, cases in code["shapes"].items():
        print(f"inductor's code per {code['chunk']}-row chunk ({shape}): " + ", ".join(
            f"{c} {x['graphs']} graphs, {x['kernels']} kernels ({x['external']} library), "
            f"{x['loops']} loops over a row, {x['passes']:.1f} passes" for c, x in cases.items()))
    if not code["shapes"]:
        print("inductor's code: none recorded" + (" (Dynamo's eager backend)" if s["dry_run"]
                                                   else ""))
    for err in code["errors"]:
        print(f"inductor's code not read: {err}")
    for shape, f in s["loss"].items():
        for c, profile in f.get("profiles", {}).items():
            print(f"profile loss ({shape}) {c}: {describe(profile, f['ms'].get(c))}")
    for shape, heads in s["profile_gaps"].items():
        for head, x in heads.items():
            line = (f"profiled gap ({shape}) {head}: matmul time "
                    f"{fmt(x['matmul_vs_floor'], '.2f')}x the unchunked floor's")
            if "against" in x:
                line += (f"; against Liger, step {x['step_ms']:+.1f} ms: device idle "
                         f"{x['idle_ms']:+.1f}, kernels by kind {_signed_kinds(x['kinds_ms'])}")
            print(line)
    for arch, row in s["recipes"].items():
        loops = ", ".join(f"{name} {x['tokens_per_second']:.0f} tokens/s"
                          + (f" MFU {x['mfu']:.1%}" if x["mfu"] is not None else "")
                          + f" {x['peak_memory_gib']:.1f} GiB" for name, x in row["loops"].items())
        print(f"recipe_bench {arch} {row['variant']} (seq {row['seq']}, batch {row['batch']}): "
              f"{loops}")
        for name, profile in row.get("profiles", {}).items():
            step_ms = 1e3 * row["loops"].get(name, {}).get("step_seconds", 0) or None
            print(f"profile recipe_bench {arch} {name}: {describe(profile, step_ms)}")
        gap = s["recipe_gaps"].get(arch)
        if gap is not None:
            print(f"profiled gap recipe_bench {arch}: recipe against the compiled peer, step "
                  f"{gap['step_ms']:+.1f} ms: device idle {gap['idle_ms']:+.1f}, kernels "
                  f"{gap['kernels']:+d}, by kind {_signed_kinds(gap['kinds_ms'])}")
    for tg in s["targets"]:
        verdict = {True: "met", False: "MISSED",
                   None: "not judged" if s["dry_run"] else "no figure"}[tg["met"]]
        if tg["stand_in"] and not s["dry_run"]:
            verdict = "STAND-IN, not judged"
        mfu = tg["name"].startswith("MFU")
        value = fmt(tg["value"], ".1%" if mfu else ".2f") + (tg["unit"] if tg["value"] else "")
        limit = f"{tg['limit']:.0%}" if mfu else f"{tg['limit']:g}{tg['unit']}"
        print(f"- target {tg['name']} [{tg['where']}]: {value} {tg['comparison']} {limit}: "
              f"{verdict}" + (f"; {tg['detail']}" if tg["detail"] else ""))
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
    summary.add_argument("--loss-shapes", nargs="+", required=True,
                         help="N,V,D,DTYPE measured for each of LOSS_TARGET_SHAPES, in order")
    summary.add_argument("--recipe-archs", nargs="+", required=True,
                         help="recipe_bench arch measured for each of RECIPE_TARGETS, in order")
    summary.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if args.command == "check-install":
        return check_install(args.require_cuda, args.require)
    if (len(args.loss_shapes), len(args.recipe_archs)) != (len(LOSS_TARGET_SHAPES),
                                                           len(RECIPE_TARGETS)):
        parser.error(f"--loss-shapes takes {len(LOSS_TARGET_SHAPES)} shapes (for "
                     f"{LOSS_TARGET_SHAPES}) and --recipe-archs {len(RECIPE_TARGETS)} "
                     f"architectures (for {tuple(RECIPE_TARGETS)}), got {args.loss_shapes} and "
                     f"{args.recipe_archs}")
    s = summarize(args.out_dir, read_steps(args.steps), args.loss_shapes, args.recipe_archs,
                  args.dry_run)
    (args.out_dir / "summary.json").write_text(json.dumps(s, indent=1) + "\n")
    print_summary(s)
    return 0 if s["complete"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
