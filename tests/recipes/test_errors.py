"""Errors a user can cause end as ONE line on stderr, naming the dotted key or the file, the
value and what is accepted, and exit 2; no traceback unless TAD_TORCHTUNE_TRACEBACK=1."""

import os
import subprocess

import pytest

from tests.recipes import tiny

pytestmark = pytest.mark.slow


def _one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def _distill(assets, tmp_path, *overrides, cfg_overrides=None, env=None):
    cfg = tiny.base_config(assets, tmp_path / "out", **(cfg_overrides or {}))
    path = tiny.write_config(cfg, tmp_path / "c.yaml")
    launch = [tiny.tune_bin(), "run", "tad_distill", "--config", str(path), *overrides]
    return subprocess.run(launch, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


CASES = [
    (["batch_size=0"], "batch_size: must be an integer >= 1, got 0"),
    (["kd_loss.k=0"], "kd_loss.k: must be an integer >= 1 (and < vocabulary size), got 0"),
    (["kd_loss.k=300"], "kd_loss.k: must be < the vocabulary size 256, got 300"),
    (["kd_loss.kk=3"], "kd_loss.kk: not an argument of tad_torchtune.losses.TADLoss; accepted: k, "
                        "beta, abar_scope, temperature, ignore_index"),
    (["kd_loss.abar_scope=sentence"],
     "kd_loss.abar_scope: must be one of ('row', 'document'), got 'sentence'"),
    (["dtype=fp16"], "dtype: must be one of ('bf16', 'fp32'), got 'fp16'"),
    (["kd_loss._component_=torch.nn.MSELoss"],
     "kd_loss._component_: 'torch.nn.MSELoss' is not a divergence; accepted: "
     "tad_torchtune.losses.DRKLLoss, tad_torchtune.losses.ForwardKLLoss, "
     "tad_torchtune.losses.ReverseKLLoss, tad_torchtune.losses.TADLoss, or another subclass of "
     "tad_torchtune.losses.Divergence"),
]


@pytest.mark.parametrize("overrides,message", CASES, ids=[c[1].split(":")[0] for c in CASES])
def test_config_errors_are_one_line(assets, tmp_path, overrides, message):
    line = _one_line(_distill(assets, tmp_path, *overrides))
    assert line == f"tad_distill: error: {message}"
    assert not (tmp_path / "out" / "checkpoints").exists()  # nothing heavy was built


def test_missing_and_truncated_checkpoint_files_are_named(assets, tmp_path):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(assets["teacher"], teacher)
    weights = teacher / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size - 1000)
    ckpt = {**tiny.base_config(assets, tmp_path)["teacher_checkpointer"],
            "checkpoint_dir": str(teacher)}
    line = _one_line(_distill(assets, tmp_path, cfg_overrides={"teacher_checkpointer": ckpt}))
    assert line.startswith(f"tad_distill: error: teacher_checkpointer.checkpoint_files: "
                           f"{str(weights)!r} is not a readable safetensors file: its tensors "
                           f"need {size} bytes, the file has {size - 1000}: truncated")
    weights.unlink()
    line = _one_line(_distill(assets, tmp_path, cfg_overrides={"teacher_checkpointer": ckpt}))
    assert line == (f"tad_distill: error: teacher_checkpointer.checkpoint_files: "
                    f"{str(weights)!r} does not exist")


def test_a_missing_corpus_names_the_dataset_key(assets, tmp_path):
    missing = tmp_path / "nowhere.jsonl"
    line = _one_line(_distill(assets, tmp_path, f"validation_dataset.source={missing}"))
    assert line.startswith("tad_distill: error: validation_dataset.source: ")
    assert str(missing) in line


def test_the_traceback_when_asked_for(assets, tmp_path):
    proc = _distill(assets, tmp_path, "batch_size=0", env={"TAD_TORCHTUNE_TRACEBACK": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    assert "ConfigError: batch_size: must be an integer >= 1, got 0" in proc.stderr


def test_tad_eval_errors_are_one_line(assets, tmp_path):
    cfg = tiny.base_config(assets, tmp_path)
    eval_cfg = {"output_dir": str(tmp_path / "eval"), "tokenizer": cfg["tokenizer"],
                "dataset": cfg["validation_dataset"],
                "teacher": {"checkpoint_dir": str(assets["teacher"])},
                "students": {"s": {"checkpoint_dir": str(tmp_path / "no_student")}}}
    proc = tiny.run_tune(["tad_eval", "--config", str(tiny.write_config(eval_cfg, tmp_path / "e.yaml"))],
                         cwd=tmp_path, check=False)
    assert _one_line(proc) == (f"tad_eval: error: students.s.checkpoint_dir: "
                               f"{str(tmp_path / 'no_student')!r} has no config.json")
