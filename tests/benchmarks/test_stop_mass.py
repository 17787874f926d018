"""``benchmarks/stop_mass.py`` at 2 steps: the padded teacher's extra rows give its end-of-text
logit exactly, the merged teacher is the reference (KL 0) and holds the stop mass the cut drops,
and the merges reach training (the two students differ, where the same seed and steps would
give the same student twice)."""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import stop_mass  # noqa: E402


def test_the_merge_reaches_a_trained_student(tmp_path):
    from tad_torchtune.models.loading import load_hf_folder

    rows = stop_mass.main(["--out", str(tmp_path), "--seeds", "0", "--steps", "2"])
    teacher = load_hf_folder(str(tmp_path / "teacher"), where="teacher",
                             device=torch.device("cpu"), dtype=torch.float32)
    w = teacher.output.weight
    assert w.shape[0] == 2050
    assert all(torch.equal(w[i], w[stop_mass.EOS]) for i in stop_mass.EXTRA)
    merged, cut = rows["teacher, merged"], rows["teacher, cut"]
    assert merged["kl_from_merged"] == 0.0 and cut["kl_from_merged"] > 0.0
    assert merged["p_eos_at_eos"] > cut["p_eos_at_eos"] > 0.0
    assert merged["eos_labels"] > 50
    assert rows["merged 0"] != rows["cut 0"]
    # a folder of another run is not reused: each records what it trained
    import json

    stamp = tmp_path / "cut_0" / "stop_mass.json"
    assert json.loads(stamp.read_text()) == {"seed": 0, "steps": 2, "merged": False}
    stop_mass.train(tmp_path / "cut_0", tmp_path / "teacher", 0, 3, merged=False)
    assert json.loads(stamp.read_text()) == {"seed": 0, "steps": 3, "merged": False}
