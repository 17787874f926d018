"""The bundled demo: CLM-only vs vanilla KD vs TAD on the Jargon File, on a laptop CPU.

    python -m tad_torchtune.demo [--out /tmp/tad_demo] [--steps N] [--seeds 0 1] [KEY=VALUE ...]

Runs, one after the other, ``tune run tad_distill --config demo`` three times with the same
number of steps (hence tokens) and seed, differing only in the distillation term:

- ``clm``: next-token cross-entropy only (``kd_weight=0``);
- ``kd``:  vanilla KD, forward KL (``kd_loss._component_=tad_torchtune.losses.ForwardKLLoss``);
- ``tad``: TAD with K=10, beta=2 (``tad_torchtune.losses.TADLoss``), the paper's best setting;

each into ``<out>/<method>_seed<s>`` (the student is exported to ``.../student``); trailing
``KEY=VALUE`` arguments are passed to every run (``eval_every_n_steps=10``). Then
``tune run tad_eval --config demo_eval`` scores every student against the bundled teacher on the
held-out text, and the figures are drawn:

- ``<out>/figure1_kl_vs_tokens.png``: held-out KL against training tokens (paper Figure 1);
- ``<out>/eval/figure2_teacher.png``: teacher tail mass vs K and mismatch rate (paper Figure 2);
- ``<out>/eval/eval.json`` and ``<out>/eval/reliability.png``: KL, CE, perplexity, Full-ECE and
  top-1 agreement per student;
- ``<out>/summary.json``: per method, the mean, sample standard deviation, min and max of those
  metrics over the seeds (``summarize_seeds``).

Logs of every ``tune run`` go to ``<out>/logs/``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tad_torchtune.errors import USER_ERROR_EXIT

#: method -> overrides of the demo config that select its distillation term
METHODS: dict[str, list[str]] = {
    "clm": ["kd_weight=0"],
    "kd": ["kd_loss._component_=tad_torchtune.losses.ForwardKLLoss"],
    "tad": ["kd_loss._component_=tad_torchtune.losses.TADLoss", "kd_loss.k=10", "kd_loss.beta=2.0"],
}


def demo_tokenizer(max_seq_len: int | None = None):
    """The bundled demo tokenizer (byte-level BPE, 2048 ids) as a torchtune tokenizer.

    A ``HuggingFaceBaseTokenizer`` with, in addition, the ``pad_id``, ``stop_tokens`` and
    ``max_seq_len`` that torchtune's generation and ``eleuther_eval`` recipes read. Usable as
    ``tokenizer: {_component_: tad_torchtune.demo.demo_tokenizer}`` from any folder.
    """
    from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer

    assets = Path(__file__).parent / "assets" / "demo"
    tok = HuggingFaceBaseTokenizer(
        str(assets / "tokenizer.json"),
        tokenizer_config_json_path=str(assets / "tokenizer_config.json"),
    )
    tok.pad_id = tok.tokenizer.token_to_id("<|pad|>")
    tok.stop_tokens = [tok.eos_id]
    tok.max_seq_len = max_seq_len
    return tok


def tune_command() -> list[str]:
    """The ``tune`` CLI of this interpreter's environment."""
    beside = Path(sys.executable).parent / "tune"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("tune")
    if found:
        return [found]
    return [sys.executable, "-m", "torchtune._cli.tune"]


def bundled_config(name: str) -> dict[str, Any] | None:
    """The shipped YAML config ``name`` as a plain dict (None when it is not shipped)."""
    from tad_torchtune.cli import shipped_configs

    path = Path(name)
    if not path.is_file():
        path = shipped_configs().get(name[:-5] if name.endswith(".yaml") else name)
    if path is None:
        return None
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def method_overrides(method: str, kd_loss_cfg: dict[str, Any] | None) -> list[str]:
    """The overrides of ``method``, plus ``~kd_loss.KEY`` for every key of the config's
    ``kd_loss`` that the method's loss class does not accept (e.g. TAD's ``k`` for forward KL)."""
    overrides = list(METHODS[method])
    component = next((o.split("=", 1)[1] for o in overrides if o.startswith("kd_loss._component_=")), None)
    if component is None or not kd_loss_cfg:
        return overrides
    from torchtune.config._utils import _get_component_from_path

    accepted = set(inspect.signature(_get_component_from_path(component)).parameters)
    set_here = {o.split("=", 1)[0].split(".", 1)[1] for o in overrides if o.startswith("kd_loss.")}
    for key in kd_loss_cfg:
        if key != "_component_" and key not in accepted and key not in set_here:
            overrides.append(f"~kd_loss.{key}")
    return overrides


def run_logged(cmd: list[str], log_path: Path) -> float:
    """Run ``cmd`` with its output in ``log_path``. When it fails on an error the user caused
    (its one ``NAME: error: ...`` line), print that line and where the log is, and exit 2; on
    any other failure, the log's tail."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        text = log_path.read_text(encoding="utf-8", errors="replace")
        user = [line for line in text.splitlines() if re.match(r"^tad_\w+: error: ", line)]
        if rc == USER_ERROR_EXIT and user:
            print(f"demo: error: {user[-1]} (log: {log_path})", file=sys.stderr)
            raise SystemExit(USER_ERROR_EXIT)
        print(text[-4000:], file=sys.stderr)
        print(f"demo: command failed (exit {rc}); full log: {log_path}", file=sys.stderr)
        raise SystemExit(rc)
    return time.time() - start


class _OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block) and exit status 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (--help lists the options)", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT)


def check_same_tokens(runs: dict[str, Path]) -> None:
    """Warn when the runs did not all train on the same number of tokens (a changed config)."""
    last: dict[str, float] = {}
    for name, run_dir in runs.items():
        path = run_dir / "metrics.jsonl"
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            tokens = [r["tokens"] for r in rows if "tokens" in r]
            if tokens:
                last[name] = float(tokens[-1])
    if len(set(last.values())) > 1:
        print(f"demo: warning: the runs saw different numbers of training tokens: {last}",
              file=sys.stderr)


#: the per-student metrics of ``eval.json`` that ``summarize_seeds`` aggregates
SUMMARY_METRICS = ("kl", "ce", "ppl", "full_ece", "top1_agreement")


def summarize_seeds(students: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method, the spread over seeds of every metric in ``SUMMARY_METRICS``.

    Args:
        students: ``eval.json``'s ``students``: run name (``<method>_seed<s>``) -> metrics.

    Returns:
        method -> ``{"seeds": n, metric: {"mean", "std", "min", "max"}}``; ``std`` is the sample
        standard deviation (n - 1 in the denominator), None for a single seed.
    """
    from tad_torchtune.plots import run_label

    grouped: dict[str, list[dict[str, Any]]] = {}
    for name, metrics in students.items():
        grouped.setdefault(run_label(name), []).append(metrics)
    summary: dict[str, dict[str, Any]] = {}
    for method, runs in grouped.items():
        entry: dict[str, Any] = {"seeds": len(runs)}
        for metric in SUMMARY_METRICS:
            values = [float(r[metric]) for r in runs if metric in r]
            if values:
                entry[metric] = {
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else None,
                    "min": min(values),
                    "max": max(values),
                }
        summary[method] = entry
    return summary


def format_summary(summary: dict[str, dict[str, Any]]) -> str:
    """``summarize_seeds``'s result as a text table, ``mean ± std`` per metric."""
    lines = [f"{'method':<8}{'seeds':>6}" + "".join(f"{m:>22}" for m in SUMMARY_METRICS)]
    for method, entry in summary.items():
        cells = []
        for metric in SUMMARY_METRICS:
            v = entry.get(metric)
            if v is None:
                cells.append(f"{'-':>22}")
            else:
                std = "" if v["std"] is None else f" ± {v['std']:.4f}"
                cells.append(f"{v['mean']:.4f}{std}".rjust(22))
        lines.append(f"{method:<8}{entry['seeds']:>6}" + "".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = _OneLineParser(
        prog="python -m tad_torchtune.demo",
        description="CLM-only vs vanilla KD vs TAD on the bundled demo corpus and teacher.",
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/tad_demo"), help="output folder")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per run (default: max_steps of the demo config)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per method and seed")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--config", default="demo", help="tad_distill config (name or path)")
    parser.add_argument("--eval-config", default="demo_eval", help="tad_eval config (name or path)")
    parser.add_argument("--skip-existing", action="store_true",
                        help="do not re-train runs whose student was already exported")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="extra tad_distill config overrides for every run, e.g. eval_every_n_steps=10")
    # KEY=VALUE overrides may follow a list option (``--seeds 0 1 max_steps=5``), where argparse
    # would read them as list items: set them aside before parsing.
    argv = list(sys.argv[1:] if argv is None else argv)
    is_override = [bool(re.match(r"^(~[A-Za-z_][\w.]*$|\+?[A-Za-z_][\w.]*=)", a)) for a in argv]
    overrides = [a for a, o in zip(argv, is_override) if o]
    args = parser.parse_args([a for a, o in zip(argv, is_override) if not o])
    args.overrides = overrides
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")

    out: Path = args.out.expanduser().resolve()
    tune = tune_command()
    distill_cfg = bundled_config(args.config)
    kd_loss_cfg = (distill_cfg or {}).get("kd_loss")
    started = time.time()
    runs: dict[str, Path] = {}
    for seed in args.seeds:
        for method in args.methods:
            name = f"{method}_seed{seed}"
            run_dir = out / name
            runs[name] = run_dir
            if args.skip_existing and (run_dir / "student" / "config.json").is_file():
                print(f"demo: {name}: student exists, skipped")
                continue
            # every run starts afresh: a run of an earlier demo in this folder goes first
            # (tad_distill refuses to start from scratch over another run's checkpoints)
            shutil.rmtree(run_dir, ignore_errors=True)
            cmd = [*tune, "run", "tad_distill", "--config", args.config,
                   f"output_dir={run_dir}", f"seed={seed}", "export_hf=true",
                   *method_overrides(method, kd_loss_cfg), *args.overrides]
            if args.steps is not None:
                cmd.append(f"max_steps={args.steps}")
            print(f"demo: training {name} ...", flush=True)
            seconds = run_logged(cmd, out / "logs" / f"{name}.log")
            print(f"demo: {name} done in {seconds:.0f}s", flush=True)

    check_same_tokens(runs)
    eval_dir = out / "eval"
    cmd = [*tune, "run", "tad_eval", "--config", args.eval_config, f"output_dir={eval_dir}"]
    # score on blocks as long as the ones the students were trained on
    data_cfg = (distill_cfg or {}).get("validation_dataset") or (distill_cfg or {}).get("dataset") or {}
    for key in ("max_seq_len", "validation_fraction"):
        if isinstance(data_cfg.get(key), (int, float)):
            cmd.append(f"dataset.{key}={data_cfg[key]}")
    cmd += [f"students.{name}.checkpoint_dir={run_dir / 'student'}" for name, run_dir in runs.items()]
    print("demo: evaluating the students ...", flush=True)
    run_logged(cmd, out / "logs" / "eval.log")

    from tad_torchtune.plots import plot_kl_vs_tokens

    figure1 = out / "figure1_kl_vs_tokens.png"
    try:
        plot_kl_vs_tokens(list(runs.values()), figure1, title="Held-out KL, demo teacher")
    except (FileNotFoundError, ValueError) as err:  # e.g. runs too short to log a validation
        print(f"demo: no Figure 1 ({err})", file=sys.stderr)
        figure1 = None

    report = json.loads((eval_dir / "eval.json").read_text())
    print(f"\n{'student':<14}{'KL(T||S)':>10}{'CE':>9}{'ppl':>9}{'Full-ECE':>10}{'top1 agr':>10}")
    for name, s in report["students"].items():
        print(f"{name:<14}{s['kl']:>10.4f}{s['ce']:>9.4f}{s['ppl']:>9.2f}{s['full_ece']:>10.4f}"
              f"{s['top1_agreement']:>10.4f}")
    t = report["teacher"]
    print(f"{'teacher':<14}{'':>10}{t['ce']:>9.4f}{t['ppl']:>9.2f}{t['full_ece']:>10.4f}")
    summary = summarize_seeds(report["students"])
    summary_path = out / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    if len(args.seeds) > 1:
        print(f"\nover {len(args.seeds)} seeds (mean ± sample std):\n{format_summary(summary)}")
    print(f"\ndemo: finished in {time.time() - started:.0f}s. Outputs:")
    print(f"  runs (metrics.jsonl, student/): {', '.join(str(p) for p in runs.values())}")
    if figure1 is not None:
        print(f"  Figure 1, held-out KL vs tokens: {figure1}")
    print(f"  Figure 2, teacher tail mass and mismatch rate: {eval_dir / 'figure2_teacher.png'}")
    print(f"  evaluation report: {eval_dir / 'eval.json'} (reliability: {eval_dir / 'reliability.png'})")
    print(f"  per-method summary over seeds: {summary_path}")
    print(f"  logs: {out / 'logs'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
