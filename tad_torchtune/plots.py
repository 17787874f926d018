"""Figures in the style of the TAD paper (arXiv 2602.20816), drawn with matplotlib (Agg).

- ``plot_kl_vs_tokens``: Figure 1, held-out KL(teacher || student) against training tokens, one
  line per run (or per method: runs named ``<method>_seed<N>`` are averaged, with a min-max band).
- ``plot_teacher_stats``: Figure 2, the teacher's mean tail mass ``alpha_K`` against K and the rate
  at which its most probable token is not the next token.
- ``plot_reliability``: Full-ECE reliability bins (accuracy and confidence per probability bin).

Command line (Figure 1 from the ``metrics.jsonl`` of ``tad_distill`` runs)::

    python -m tad_torchtune.plots RUN_DIR [RUN_DIR ...] -o fig1.png [--metric val_kl] [--logy] \
        [--x tokens|train_seconds]

A run's ``<output_dir>/metrics.jsonl`` holds one JSON object per line; every line carries
``step``, ``tokens`` (valid tokens trained on) and ``train_seconds`` (the optimizer steps' own
time, summed over resumes), validation lines ``val_kl`` (and ``val_ce``, ``val_ppl``), training
lines ``loss``. ``--x train_seconds`` compares methods of different cost (a teacher cache
against the live teacher) at equal training time rather than equal tokens.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tad_torchtune.errors import reports_user_errors  # noqa: E402

_SEED_SUFFIX = re.compile(r"[_-]seed\d+$")

#: the record fields a curve can be drawn against, with their axis labels
PROG = "python -m tad_torchtune.plots"
X_AXES: dict[str, str] = {"tokens": "training tokens",
                          "train_seconds": "training time (s, evaluation and checkpoints excluded)"}


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """The records of ``<run>/metrics.jsonl`` (or of ``run`` itself when it is the file)."""
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"runs: no metrics.jsonl at {str(path)!r}; accepted: a "
                                f"tad_distill output_dir or its metrics.jsonl")
    rows = []
    with open(path, encoding="utf-8") as f:
        lines = [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]
    for i, (n, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # the last line a kill cut short: tad_distill drops it too
                break
            raise ValueError(f"runs: {str(path)!r} line {n} is not JSON ({e.msg}); accepted: "
                             f"the metrics.jsonl tad_distill writes") from None
    return rows


def metric_curve(rows: list[dict[str, Any]], metric: str = "val_kl",
                 x: str = "tokens") -> tuple[list[float], list[float]]:
    """``(xs, values)`` of the records that carry ``metric`` and ``x`` (a field of ``X_AXES``),
    sorted by ``x``; an ``x`` logged twice (files joined by hand) keeps its last value."""
    points: dict[float, float] = {}
    for row in rows:
        if metric in row and x in row and row[metric] is not None:
            points[float(row[x])] = float(row[metric])
    xs = sorted(points)
    return xs, [points[x] for x in xs]


def run_label(run: str | Path) -> str:
    """A run's label: its folder name without a ``_seed<N>`` suffix."""
    path = Path(run)
    name = path.parent.name if path.name == "metrics.jsonl" else path.name
    return _SEED_SUFFIX.sub("", name) or name


def group_curves(
    runs: list[str | Path] | dict[str, str | Path], metric: str = "val_kl", x: str = "tokens"
) -> dict[str, tuple[list[float], list[float], list[float], list[float], int]]:
    """Label -> ``(xs, mean, min, max, number of runs)`` of ``metric`` against ``x``.

    A list of runs is labelled by ``run_label``, a dict by its keys. Runs sharing a label are
    combined over the ``x`` values that all of them logged (token counts are shared by runs of
    one configuration; times are not, so ``train_seconds`` is for one run per label).

    Raises:
        ValueError: if ``x`` is not a field of ``X_AXES``, or no run has any record with
            ``metric`` and ``x``.
    """
    if x not in X_AXES:
        raise ValueError(f"--x: {x!r}; accepted: {', '.join(X_AXES)}")
    items = runs.items() if isinstance(runs, dict) else [(run_label(r), r) for r in runs]
    grouped: dict[str, list[tuple[str, dict[float, float]]]] = defaultdict(list)
    fields: set[str] = set()
    skipped = []
    for label, run in items:
        records = read_metrics(run)
        fields.update(k for r in records for k in r if k not in ("step", "time", *X_AXES))
        xs, ys = metric_curve(records, metric, x)
        if xs:
            grouped[label].append((str(run), dict(zip(xs, ys))))
        else:
            skipped.append(str(run))
    if not grouped:
        raise ValueError(f"--metric: no record with {metric!r} and {x!r} in any of "
                         f"{[str(r) for r in (runs.values() if isinstance(runs, dict) else runs)]}"
                         f"; accepted: a field they log: {sorted(fields)}")
    for run in skipped:
        print(f"{PROG}: warning: {run!r} left out: no record with {metric!r} and {x!r}",
              file=sys.stderr)
    out = {}
    for label, curves in grouped.items():
        xs = sorted(set.intersection(*(set(c) for _, c in curves)))
        if not xs:  # runs of other token counts, or times (never shared): a line each
            print(f"{PROG}: warning: the {len(curves)} runs labelled {label!r} share no {x} "
                  f"value: drawn one line each, not their mean", file=sys.stderr)
            for run, curve in curves:
                own = sorted(curve)
                ys = [curve[v] for v in own]
                out[f"{label} ({Path(run).name})"] = (own, ys, ys, ys, 1)
            continue
        cols = [[c[x] for _, c in curves] for x in xs]
        out[label] = ([*xs], [sum(v) / len(v) for v in cols], [min(v) for v in cols],
                      [max(v) for v in cols], len(curves))
    return out


def plot_kl_vs_tokens(
    runs: list[str | Path] | dict[str, str | Path],
    out_path: str | Path,
    *,
    metric: str = "val_kl",
    logy: bool = False,
    title: str | None = None,
    x: str = "tokens",
) -> Path:
    """Figure 1: ``metric`` (default held-out KL) against training tokens (or ``x``), one line
    per method.

    Args:
        runs: run folders (or ``metrics.jsonl`` files); a list is labelled by folder name with any
            ``_seed<N>`` suffix removed, a dict by its keys. Runs sharing a label are averaged
            over the token counts they all logged, and their min-max range is shaded.
        out_path: the PNG to write.
        metric: the record field on the y axis.
        logy: logarithmic y axis.
        title: figure title.
        x: the record field on the x axis (``X_AXES``): ``tokens`` or ``train_seconds``.

    Returns:
        ``out_path`` as a ``Path``.

    Raises:
        ValueError: as ``group_curves``.
    """
    curves = group_curves(runs, metric, x)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, (xs, mean, lo, hi, n_runs) in curves.items():
        name = label if n_runs == 1 else f"{label} (mean of {n_runs})"
        (line,) = ax.plot(xs, mean, marker="o", markersize=3, label=name)
        if n_runs > 1:
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel("held-out KL(teacher || student)" if metric == "val_kl" else metric)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title or f"{metric} vs {X_AXES[x].split(' (')[0]}")
    return _save(fig, out_path)


def plot_teacher_stats(teachers: dict[str, dict[str, Any]], out_path: str | Path) -> Path:
    """Figure 2: (a) mean tail mass ``alpha_K`` against K, (b) next-token vs mode mismatch rate.

    Args:
        teachers: label -> ``TeacherMetrics.compute()`` output (or its JSON round trip, whose
            ``tail_mass`` keys are strings).
        out_path: the PNG to write.
    """
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(9.6, 3.8))
    for label, stats in teachers.items():
        tail = sorted((int(k), float(v)) for k, v in stats["tail_mass"].items())
        ax_a.plot([k for k, _ in tail], [v for _, v in tail], marker="o", label=label)
    ax_a.set_xscale("log")
    ax_a.set_xlabel("K")
    ax_a.set_ylabel(r"mean tail mass $\alpha^T_K$")
    ax_a.set_title("(a) Tail probability mass")
    ax_a.grid(True, alpha=0.3)
    ax_a.legend()
    labels = list(teachers)
    rates = [100.0 * float(teachers[k]["mismatch_rate"]) for k in labels]
    bars = ax_b.bar(labels, rates, color="tab:orange")
    ax_b.bar_label(bars, fmt="%.1f%%")
    ax_b.set_ylabel("top-1 != next token (%)")
    ax_b.set_ylim(0, max(100.0, *rates) if rates else 100.0)
    ax_b.set_title("(b) Mismatch rate")
    return _save(fig, out_path)


def plot_reliability(models: dict[str, dict[str, Any]], out_path: str | Path) -> Path:
    """Full-ECE reliability bins: per bin, the share of entries that are the label against the mean
    predicted probability (the diagonal is perfect calibration).

    Args:
        models: label -> the ``reliability`` entry of ``StudentMetrics``/``TeacherMetrics``.
        out_path: the PNG to write.
    """
    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    for label, rel in models.items():
        pts = [(c, a) for c, a, n in zip(rel["confidence"], rel["accuracy"], rel["count"]) if n > 0]
        ax.plot([c for c, _ in pts], [a for _, a in pts], marker="o", markersize=3, label=label)
    ax.set_xlabel("mean predicted probability in bin")
    ax.set_ylabel("fraction that is the next token")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title("Full-ECE reliability")
    return _save(fig, out_path)


def _save(fig, out_path: str | Path) -> Path:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


@reports_user_errors(PROG)
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Figure 1 of the TAD paper: held-out KL against training tokens for several "
        "tad_distill runs (folders holding metrics.jsonl).",
    )
    parser.add_argument("runs", nargs="+", help="run folders or metrics.jsonl files")
    parser.add_argument("-o", "--output", default="fig1.png", help="PNG to write")
    parser.add_argument("--metric", default="val_kl", help="field on the y axis (val_kl, val_ce, ...)")
    parser.add_argument("--logy", action="store_true", help="logarithmic y axis")
    parser.add_argument("--title", default=None)
    parser.add_argument("--x", default="tokens",  # checked by group_curves: one line
                        help="field on the x axis: tokens, or train_seconds to compare methods "
                        "of different cost at equal training time")
    args = parser.parse_args(argv)
    out = plot_kl_vs_tokens(args.runs, args.output, metric=args.metric, logy=args.logy,
                            title=args.title, x=args.x)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
