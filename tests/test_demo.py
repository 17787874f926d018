"""The bundled demo: its seed summary, and the whole driver end to end at a reduced size."""

import json
import math
from pathlib import Path

import pytest

from tad_torchtune.data import resolve_asset
from tad_torchtune.demo import bundled_config, format_summary, summarize_seeds

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
def test_demo_end_to_end_reduced(tmp_path, capsys, monkeypatch):
    """The demo driver (``demo.main``, its ``tune run``s real) at 2 steps, TAD, 2 seeds, one
    held-out batch: the summary is the seeds' statistics of the evaluation report, the printed
    table its numbers, and Figure 1 plots the runs' logged held-out KL (the real demo only
    differs in its step count, methods and seeds)."""
    from tad_torchtune import demo, plots

    figures = {}
    real_save = plots._save

    def keep(fig, path):
        figures[Path(path).name] = fig
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    eval_cfg = bundled_config("demo_eval")
    eval_cfg["max_batches"] = 1
    eval_path = tmp_path / "demo_eval.yaml"
    eval_path.write_text(json.dumps(eval_cfg))  # JSON is YAML
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--steps", "2", "--seeds", "0", "1", "--methods", "tad",
                      "--eval-config", str(eval_path), "eval_every_n_steps=1",
                      "max_eval_batches=1", "log_every_n_steps=1"]) == 0
    stdout = capsys.readouterr().out
    assert "over 2 seeds" in stdout and str(out / "figure1_kl_vs_tokens.png") in stdout

    runs = {s: [json.loads(x) for x in (out / f"tad_seed{s}" / "metrics.jsonl").read_text()
                .splitlines()] for s in (0, 1)}
    val = {s: {r["tokens"]: r["val_kl"] for r in rows if "val_kl" in r} for s, rows in runs.items()}
    assert all(len(v) == 2 and all(math.isfinite(x) for x in v.values()) for v in val.values())
    assert val[0] != val[1]  # two seeds, two students
    for s in (0, 1):
        assert (out / f"tad_seed{s}" / "student" / "config.json").is_file()

    # Figure 1: the mean of the seeds' held-out KL at the tokens both logged, and their range
    ax = figures["figure1_kl_vs_tokens.png"].axes[0]
    (line,) = ax.get_lines()
    tokens = sorted(set(val[0]) & set(val[1]))
    assert line.get_label() == "tad (mean of 2)" and list(line.get_xdata()) == tokens
    assert list(line.get_ydata()) == pytest.approx([(val[0][t] + val[1][t]) / 2 for t in tokens])

    report = json.loads((out / "eval" / "eval.json").read_text())
    students = report["students"]
    assert sorted(students) == ["tad_seed0", "tad_seed1"]
    for name, m in students.items():  # the printed table is the report
        assert (f"{name:<14}{m['kl']:>10.4f}{m['ce']:>9.4f}{m['ppl']:>9.2f}"
                f"{m['full_ece']:>10.4f}{m['top1_agreement']:>10.4f}") in stdout
        # max_batches=1: one batch of 8 blocks, as long as the training ones (T - 1 predicted)
        block = bundled_config("demo")["validation_dataset"]["max_seq_len"]
        assert m["kl"] > 0 and m["num_tokens"] == 8 * (block - 1)
    assert all(0 < v < 1 for v in report["teacher"]["tail_mass"].values())
    for png in ("figure1_kl_vs_tokens.png", "eval/figure2_teacher.png", "eval/reliability.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png

    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["tad"] and summary["tad"]["seeds"] == 2
    for metric in ("kl", "ce", "ppl", "full_ece", "top1_agreement"):
        a, b = students["tad_seed0"][metric], students["tad_seed1"][metric]
        entry = summary["tad"][metric]
        assert entry["mean"] == pytest.approx((a + b) / 2, rel=1e-12)
        assert entry["std"] == pytest.approx(abs(a - b) / math.sqrt(2), rel=1e-9)
        assert (entry["min"], entry["max"]) == (min(a, b), max(a, b))

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
def test_demo_errors_are_one_line(tmp_path, capsys):
    """A bad option, and a bad override that tad_distill refuses: one line each, exit 2 (the
    driver in this process; the second error comes from its `tune run tad_distill`)."""
    from tad_torchtune import demo

    def run(*args):
        capsys.readouterr()
        with pytest.raises(SystemExit) as stopped:
            demo.main(["--out", str(tmp_path), *args])
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and "Traceback" not in err, err[-2000:]
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        return lines[0]

    assert run("--steps", "0") == ("python -m tad_torchtune.demo: error: --steps must be >= 1, "
                                   "got 0 (--help lists the options)")
    line = run("--methods", "tad", "batch_size=0")
    assert line == ("demo: error: tad_distill: error: batch_size: must be an integer >= 1, got 0 "
                    f"(log: {tmp_path / 'logs' / 'tad_seed0.log'})")
