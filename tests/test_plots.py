"""Figures from synthetic run logs and metric outputs."""

import json
import subprocess
import sys

import pytest
import torch

from tad_torchtune.metrics import StudentMetrics, TeacherMetrics
from tad_torchtune.plots import (
    group_curves,
    metric_curve,
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


def test_figure2_and_reliability_png_from_metrics(tmp_path):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 9, 80, generator=g) * 3
    labels = torch.randint(0, 80, (2, 9), generator=g)
    teacher = TeacherMetrics()
    teacher.update(logits, labels)
    student = StudentMetrics()
    student.update(logits * 0.5, logits, labels)
    t = json.loads(json.dumps(teacher.compute()))  # as read back from eval.json: string keys
    assert_png(plot_teacher_stats({"teacher": t, "other": teacher.compute()}, tmp_path / "f2.png"))
    rel = {"teacher": t["reliability"], "student": student.compute()["reliability"]}
    assert_png(plot_reliability(rel, tmp_path / "rel.png"))
