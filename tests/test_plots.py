"""Figures from synthetic run logs and metric outputs: what each figure plots (its lines, bands
and bars) is the data it was given, and the command line writes a PNG."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tad_torchtune import plots
from tad_torchtune.metrics import StudentMetrics, TeacherMetrics
from tad_torchtune.plots import (
    group_curves,
    metric_curve,
    plot_kl_vs_tokens,
    plot_reliability,
    plot_teacher_stats,
    read_metrics,
    run_label,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(folder, kls, tokens_per_step=2048, eval_every=10):
    folder.mkdir(parents=True)
    lines = []
    for i, kl in enumerate(kls):
        step = (i + 1) * eval_every
        tokens = step * tokens_per_step
        lines.append({"step": step - 5, "tokens": tokens - 5 * tokens_per_step, "loss": 3.0, "lr": 1e-3})
        lines.append({"step": step, "tokens": tokens, "val_kl": kl, "val_ce": 4.0, "val_ppl": 54.6})
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    return folder


def assert_png(path):
    assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


@pytest.fixture
def figures(monkeypatch):
    """The figures the plotting functions save, by path (kept after ``plt.close``)."""
    saved = {}
    real = plots._save

    def spy(fig, out_path):
        saved[str(out_path)] = fig
        return real(fig, out_path)

    monkeypatch.setattr(plots, "_save", spy)
    return saved


def _lines(ax):
    """``label -> (x, y)`` of an axis' lines."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for line in ax.get_lines()}


def test_read_and_group_runs(tmp_path):
    a = write_run(tmp_path / "tad_seed0", [1.0, 0.8, 0.6])
    b = write_run(tmp_path / "tad_seed1", [1.2, 1.0, 0.8, 0.7])  # one more eval than seed 0
    kd = write_run(tmp_path / "kd_seed0", [1.1, 0.9, 0.7])
    assert run_label(a) == "tad" and run_label(kd / "metrics.jsonl") == "kd"
    rows = read_metrics(a)
    assert len(rows) == 6
    assert metric_curve(rows, "val_kl") == ([20480.0, 40960.0, 61440.0], [1.0, 0.8, 0.6])
    assert metric_curve(rows, "loss")[0] == [10240.0, 30720.0, 51200.0]
    curves = group_curves([a, b, kd])
    xs, mean, lo, hi, n = curves["tad"]
    assert n == 2 and xs == [20480.0, 40960.0, 61440.0]  # tokens both seeds logged
    assert mean == pytest.approx([1.1, 0.9, 0.7]) and lo == [1.0, 0.8, 0.6] and hi == [1.2, 1.0, 0.8]
    assert curves["kd"][4] == 1
    with pytest.raises(ValueError, match="val_kl"):
        group_curves([write_run(tmp_path / "empty", [])])


def test_figure1_cli_writes_png(tmp_path):
    runs = [write_run(tmp_path / f"{m}_seed{s}", [1.0 + 0.1 * s, 0.9, 0.8 - 0.1 * (m == "tad")])
            for m in ("clm", "kd", "tad") for s in (0, 1)]
    out = tmp_path / "fig" / "fig1.png"
    proc = subprocess.run(
        [sys.executable, "-m", "tad_torchtune.plots", *map(str, runs), "-o", str(out), "--logy"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout
    assert_png(out)


def test_the_plot_commands_mistakes_are_one_line(tmp_path, capsys):
    from tad_torchtune.plots import main

    run = write_run(tmp_path / "tad_seed0", [1.0, 0.8])
    for argv, line in [
        ([str(tmp_path / "nope"), "-o", str(tmp_path / "x.png")],
         f"python -m tad_torchtune.plots: error: runs: no metrics.jsonl at "
         f"{str(tmp_path / 'nope')!r}; accepted: a tad_distill output_dir or "
         f"its metrics.jsonl"),
        ([str(run), "--x", "seconds", "-o", str(tmp_path / "x.png")],
         "python -m tad_torchtune.plots: error: --x: 'seconds'; accepted: tokens, train_seconds"),
        ([str(run), "--metric", "val_klx", "-o", str(tmp_path / "x.png")],
         f"python -m tad_torchtune.plots: error: --metric: no record with 'val_klx' and 'tokens' "
         f"in any of [{str(run)!r}]; accepted: a field they log: ['loss', 'lr', 'val_ce', 'val_kl', 'val_ppl']"),
    ]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        assert stopped.value.code == 2
        assert capsys.readouterr().err.strip() == line


def test_figure1_plots_the_mean_of_the_seeds_and_their_range(tmp_path, figures):
    runs = [write_run(tmp_path / "tad_seed0", [1.0, 0.8, 0.6]),
            write_run(tmp_path / "tad_seed1", [1.2, 1.0, 0.8, 0.7]),
            write_run(tmp_path / "kd_seed0", [1.1, 0.9, 0.7])]
    out = plot_kl_vs_tokens(runs, tmp_path / "fig1.png", logy=True)
    assert_png(out)
    ax = figures[str(out)].axes[0]
    xs = [20480.0, 40960.0, 61440.0]
    lines = _lines(ax)
    assert sorted(lines) == ["kd", "tad (mean of 2)"]
    assert lines["tad (mean of 2)"][0] == xs
    assert lines["tad (mean of 2)"][1] == pytest.approx([1.1, 0.9, 0.7])
    assert lines["kd"] == (xs, [1.1, 0.9, 0.7])
    (band,) = ax.collections  # one min-max band: the method with two seeds
    vertices = band.get_paths()[0].vertices
    for x, lo, hi in zip(xs, [1.0, 0.8, 0.6], [1.2, 1.0, 0.8]):
        at_x = vertices[np.isclose(vertices[:, 0], x), 1]
        assert at_x.min() == pytest.approx(lo) and at_x.max() == pytest.approx(hi)
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "training tokens"


def test_runs_that_cannot_share_a_line_are_said(tmp_path, capsys):
    """Runs of one label with no x value in common (times, which two runs never share, or other
    token counts) are drawn one line each with a warning (before, a legend entry with no point,
    silently); a run with no record of the metric is left out with a warning (before, without
    one); a line a kill cut short ends the file read (as tad_distill reads it), while a bad line
    before the last is named with its file and line."""
    a = write_run(tmp_path / "tad_seed0", [1.0, 0.8])
    b = write_run(tmp_path / "tad_seed1", [1.2, 1.0], tokens_per_step=1000)
    empty = write_run(tmp_path / "noval", [])
    capsys.readouterr()
    curves = group_curves([a, b, empty])
    assert sorted(curves) == ["tad (tad_seed0)", "tad (tad_seed1)"]
    assert curves["tad (tad_seed1)"][:2] == ([10000.0, 20000.0], [1.2, 1.0])
    assert capsys.readouterr().err.splitlines() == [
        f"python -m tad_torchtune.plots: warning: {str(empty)!r} left out: no record with "
        f"'val_kl' and 'tokens'",
        "python -m tad_torchtune.plots: warning: the 2 runs labelled 'tad' share no tokens "
        "value: drawn one line each, not their mean"]
    cut = a / "metrics.jsonl"
    cut.write_text(cut.read_text().rstrip("\n") + '\n{"step": 30, "tok')
    assert read_metrics(a) == [json.loads(x) for x in cut.read_text().splitlines()[:4]]
    cut.write_text('{"step": 1, "tok\n' + cut.read_text())
    with pytest.raises(ValueError) as err:
        read_metrics(a)
    assert str(err.value) == (f"runs: {str(cut)!r} line 1 is not JSON (Unterminated string "
                              f"starting at); accepted: the metrics.jsonl tad_distill writes")


def test_figure1_against_training_time(tmp_path, figures):
    """``--x train_seconds``: each run's curve at the training times it logged (a cached run
    reaching a KL sooner than a live-teacher run shows it)."""
    runs = {}
    for name, per_step in (("live", 2.0), ("cached", 0.5)):
        folder = write_run(tmp_path / name, [1.0, 0.8])
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
        for row in rows:
            row["train_seconds"] = per_step * row["step"]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs[name] = folder
    assert group_curves(runs, "val_kl", x="train_seconds")["cached"][:2] == ([5.0, 10.0], [1.0, 0.8])
    out = plot_kl_vs_tokens(runs, tmp_path / "fig.png", x="train_seconds")
    ax = figures[str(out)].axes[0]
    assert _lines(ax) == {"live": ([20.0, 40.0], [1.0, 0.8]), "cached": ([5.0, 10.0], [1.0, 0.8])}
    assert ax.get_xlabel().startswith("training time")
    with pytest.raises(ValueError, match="--x: 'seconds'; accepted: tokens, train_seconds"):
        group_curves(runs, x="seconds")
    with pytest.raises(ValueError, match="no record with 'val_kl' and 'train_seconds'"):
        group_curves([write_run(tmp_path / "old", [1.0])], x="train_seconds")


def test_figure2_and_reliability_plot_the_metrics(tmp_path, figures):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 9, 80, generator=g) * 3
    labels = torch.randint(0, 80, (2, 9), generator=g)
    teacher = TeacherMetrics()
    teacher.update(logits, labels)
    student = StudentMetrics()
    student.update(logits * 0.5, logits, labels)
    t = json.loads(json.dumps(teacher.compute()))  # as read back from eval.json: string keys
    other = TeacherMetrics()  # another teacher: other tail masses and another mismatch rate
    right = (torch.randn(2, 9, 80, generator=g) * 6).scatter_add(
        -1, labels.unsqueeze(-1), torch.tensor([[[50.0]] * 9, [[0.0]] * 9]))  # row 0 right
    other.update(right, labels)
    s = other.compute()
    assert s["mismatch_rate"] != t["mismatch_rate"]
    out = plot_teacher_stats({"teacher": t, "other": s}, tmp_path / "f2.png")
    assert_png(out)
    ax_a, ax_b = figures[str(out)].axes
    for label, stats in (("teacher", t), ("other", s)):
        tail = sorted((int(k), float(v)) for k, v in stats["tail_mass"].items())
        assert _lines(ax_a)[label] == ([k for k, _ in tail], [v for _, v in tail])
    assert [p.get_height() for p in ax_b.patches] == pytest.approx(
        [100 * t["mismatch_rate"], 100 * s["mismatch_rate"]])
    assert [x.get_text() for x in ax_b.get_xticklabels()] == ["teacher", "other"]

    rel = {"teacher": t["reliability"], "student": student.compute()["reliability"]}
    out = plot_reliability(rel, tmp_path / "rel.png")
    assert_png(out)
    lines = _lines(figures[str(out)].axes[0])
    for label, r in rel.items():
        kept = [i for i, n in enumerate(r["count"]) if n > 0]  # empty bins are not drawn
        assert 0 < len(kept) < len(r["count"])
        assert lines[label] == ([r["confidence"][i] for i in kept], [r["accuracy"][i] for i in kept])
