"""The bundled demo: its seed summary, and the whole driver end to end at a reduced size."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tad_torchtune.data import resolve_asset
from tad_torchtune.demo import format_summary, summarize_seeds

DEMO = Path(resolve_asset("pkg://demo"))


def test_summarize_seeds_hand_computed():
    students = {
        "kd_seed0": {"kl": 0.2, "ce": 4.0, "ppl": 54.0, "full_ece": 0.01, "top1_agreement": 0.6},
        "kd_seed1": {"kl": 0.4, "ce": 5.0, "ppl": 60.0, "full_ece": 0.03, "top1_agreement": 0.7},
        "kd_seed2": {"kl": 0.3, "ce": 4.5, "ppl": 57.0, "full_ece": 0.02, "top1_agreement": 0.8},
        "tad_seed0": {"kl": 0.1, "ce": 3.0, "ppl": 20.0, "full_ece": 0.05, "top1_agreement": 0.9},
    }
    summary = summarize_seeds(students)
    assert set(summary) == {"kd", "tad"}
    kd = summary["kd"]
    assert kd["seeds"] == 3
    # mean 0.3; sample std sqrt(((-0.1)^2 + 0.1^2 + 0) / 2) = 0.1
    assert kd["kl"]["mean"] == pytest.approx(0.3)
    assert kd["kl"]["std"] == pytest.approx(0.1)
    assert (kd["kl"]["min"], kd["kl"]["max"]) == (0.2, 0.4)
    assert kd["ce"]["std"] == pytest.approx(0.5)
    assert kd["ppl"]["std"] == pytest.approx(3.0)
    assert summary["tad"]["seeds"] == 1 and summary["tad"]["kl"]["std"] is None
    table = format_summary(summary)
    assert "0.3000 ± 0.1000" in table and "0.1000" in table.splitlines()[2]


def test_demo_method_overrides():
    from tad_torchtune.demo import method_overrides

    tad_cfg = {"_component_": "tad_torchtune.losses.TADLoss", "k": 5, "beta": 1.0, "temperature": 1.0}
    assert method_overrides("clm", tad_cfg) == ["kd_weight=0"]
    assert method_overrides("kd", tad_cfg) == [
        "kd_loss._component_=tad_torchtune.losses.ForwardKLLoss", "~kd_loss.k", "~kd_loss.beta"]
    assert method_overrides("tad", {"_component_": "tad_torchtune.losses.ForwardKLLoss"}) == [
        "kd_loss._component_=tad_torchtune.losses.TADLoss", "kd_loss.k=10", "kd_loss.beta=2.0"]


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO / "teacher" / "model.safetensors").is_file(),
                    reason="demo teacher not built")
def test_demo_end_to_end_reduced(tmp_path):
    """``python -m tad_torchtune.demo`` at 3 steps, 2 seeds, 2 methods: every output exists and
    every number in it is finite (the real demo only differs in its step count)."""
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "tad_torchtune.demo", "--out", str(out), "--steps", "3",
         "--seeds", "0", "1", "--methods", "kd", "tad", "eval_every_n_steps=1",
         "max_eval_batches=1", "log_every_n_steps=1"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "over 2 seeds" in proc.stdout and str(out / "figure1_kl_vs_tokens.png") in proc.stdout

    for png in ("figure1_kl_vs_tokens.png", "eval/figure2_teacher.png", "eval/reliability.png"):
        assert (out / png).stat().st_size > 1000, png
    runs = ["kd_seed0", "tad_seed0", "kd_seed1", "tad_seed1"]
    for run in runs:
        assert (out / run / "student" / "config.json").is_file()
        rows = [json.loads(x) for x in (out / run / "metrics.jsonl").read_text().splitlines()]
        val = [r["val_kl"] for r in rows if "val_kl" in r]
        assert len(val) >= 3 and all(math.isfinite(v) for v in val)

    report = json.loads((out / "eval" / "eval.json").read_text())
    assert sorted(report["students"]) == sorted(runs)
    for metrics in report["students"].values():
        for key in ("kl", "ce", "ppl", "full_ece", "top1_agreement"):
            assert math.isfinite(metrics[key]), key
        assert metrics["kl"] > 0
    assert all(0 < v < 1 for v in report["teacher"]["tail_mass"].values())

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"kd", "tad"}
    for method, entry in summary.items():
        assert entry["seeds"] == 2
        kls = [report["students"][f"{method}_seed{s}"]["kl"] for s in (0, 1)]
        assert entry["kl"]["mean"] == pytest.approx(sum(kls) / 2)
        assert entry["kl"]["std"] == pytest.approx(abs(kls[0] - kls[1]) / math.sqrt(2))


def test_teacher_folder_opens_with_auto_classes_and_matches_the_demo_tokenizer():
    """The bundled teacher is a self-contained Hugging Face folder: ``AutoModelForCausalLM`` and
    ``AutoTokenizer`` load it alone, and its tokenizer encodes every corpus document exactly as
    the demo tokenizer does without special tokens (the HF tokenizer adds none; torchtune adds
    BOS/EOS when asked, as the datasets do)."""
    import gzip

    transformers = pytest.importorskip("transformers")
    from tad_torchtune.demo import demo_tokenizer

    teacher = DEMO / "teacher"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (teacher / name).read_bytes() == (DEMO / name).read_bytes(), name
    hf_tok = transformers.AutoTokenizer.from_pretrained(teacher)
    tok = demo_tokenizer()
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (0, 1, 2)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    cfg = json.loads((teacher / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (0, 1, 2)

    with gzip.open(DEMO / "jargon.jsonl.gz", "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    texts = docs + ["", " leading space", "two\nlines\n\n", "<|begin_of_text|>x<|end_of_text|>"]
    for text in texts:
        ids = tok.encode(text, add_bos=False, add_eos=False)
        assert hf_tok(text)["input_ids"] == ids, text[:60]
        assert tok.encode(text, add_bos=True, add_eos=True) == [0, *ids, 1]
    assert hf_tok.decode(hf_tok(docs[-1])["input_ids"]) == docs[-1]

    model = transformers.AutoModelForCausalLM.from_pretrained(teacher)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == len(hf_tok)


@pytest.mark.slow
def test_demo_errors_are_one_line(tmp_path):
    """A bad option, and a bad override that tad_distill refuses: one line each, exit 2."""
    import subprocess
    import sys

    def run(*args):
        proc = subprocess.run([sys.executable, "-m", "tad_torchtune.demo", "--out", str(tmp_path),
                               *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        return lines[0]

    assert run("--steps", "0") == ("python -m tad_torchtune.demo: error: --steps must be >= 1, "
                                   "got 0 (--help lists the options)")
    line = run("--methods", "tad", "batch_size=0")
    assert line == ("demo: error: tad_distill: error: batch_size: must be an integer >= 1, got 0 "
                    f"(log: {tmp_path / 'logs' / 'tad_seed0.log'})")
