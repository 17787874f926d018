"""``tune run tad_eval`` end to end on tiny Hugging Face checkpoints written by the test, and
its errors."""

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tad_torchtune.data import TextBlockDataset, resolve_asset  # noqa: E402
from tests.helpers import tune  # noqa: E402
from tests.helpers.teachers import save_hf_llama  # noqa: E402

pytestmark = pytest.mark.slow
TUNE = tune.tune_bin()
DEMO = Path(resolve_asset("pkg://demo"))
WORDS = ("the hacker wrote a kludge to frob the bits of the daemon while the wizard "
         "grepped the source for a bug and found a feature in the core dump").split()


def write_corpus(path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (40,), generator=g).tolist())
            for _ in range(12)]
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    return path


def write_config(path: Path, **entries) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(entries, sort_keys=False))
    return path


def tokenizer_cfg():
    return {
        "_component_": "torchtune.modules.transforms.tokenizers.HuggingFaceBaseTokenizer",
        "tokenizer_json_path": "pkg://demo/tokenizer.json",
        "tokenizer_config_json_path": "pkg://demo/tokenizer_config.json",
    }


def held_out_blocks(data: Path) -> TextBlockDataset:
    """The held-out blocks ``held_out_dataset(data)`` gives tad_eval, built here for the
    references."""
    from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer

    tok = HuggingFaceBaseTokenizer(resolve_asset("pkg://demo/tokenizer.json"),
                                   tokenizer_config_json_path=resolve_asset("pkg://demo/tokenizer_config.json"))
    return TextBlockDataset(tok, source=str(data), max_seq_len=32, split="validation",
                            validation_fraction=0.5)


def held_out_dataset(data: Path) -> dict:
    return {"_component_": "tad_torchtune.data.text_block_dataset", "source": str(data),
            "max_seq_len": 32, "split": "validation", "validation_fraction": 0.5}


def run_tune(*args, timeout=300):
    proc = subprocess.run([TUNE, "run", "tad_eval", *args], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.skipif(not (DEMO / "tokenizer.json").is_file(), reason="demo tokenizer not built")
def test_tad_eval_end_to_end(tmp_path):
    teacher = save_hf_llama(tmp_path / "teacher", seed=0)
    other = save_hf_llama(tmp_path / "other", seed=1, tied=True)
    data = write_corpus(tmp_path / "held_out.jsonl")
    dataset = held_out_dataset(data)
    out = tmp_path / "out"
    cfg = write_config(
        tmp_path / "eval.yaml", output_dir=str(out), device="cpu", dtype="fp32",
        tokenizer=tokenizer_cfg(), dataset=dataset, teacher={"checkpoint_dir": str(teacher)},
        students={"same": {"checkpoint_dir": str(teacher)}, "other": {"checkpoint_dir": str(other)}},
        batch_size=3, num_bins=10, tail_ks=[1, 2, 5, 10, 20, 50],
    )
    proc = run_tune("--config", str(cfg))
    assert "tad_eval: outputs in" in proc.stdout and str(out / "eval.json") in proc.stdout
    for name in ("eval.json", "figure2_teacher.png", "reliability.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = json.loads((out / "eval.json").read_text())

    # reference: transformers on the same held-out blocks, labels shifted left
    blocks = held_out_blocks(data)
    x = torch.stack([blocks[i]["tokens"] for i in range(len(blocks))])
    hf_t = transformers.LlamaForCausalLM.from_pretrained(teacher).eval()
    hf_o = transformers.LlamaForCausalLM.from_pretrained(other).eval()
    with torch.no_grad():
        lt, lo = hf_t(x).logits[:, :-1], hf_o(x).logits[:, :-1]
    y = x[:, 1:]
    ce_t = torch.nn.functional.cross_entropy(lt.flatten(0, 1), y.flatten()).item()
    ce_o = torch.nn.functional.cross_entropy(lo.flatten(0, 1), y.flatten()).item()
    log_p, log_q = lt.log_softmax(-1), lo.log_softmax(-1)
    kl_o = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    agree_o = (lt.argmax(-1) == lo.argmax(-1)).double().mean().item()

    t, same, oth = report["teacher"], report["students"]["same"], report["students"]["other"]
    assert t["num_tokens"] == same["num_tokens"] == y.numel()
    assert t["ce"] == pytest.approx(ce_t, rel=1e-4)
    assert same["kl"] == pytest.approx(0.0, abs=1e-5) and same["top1_agreement"] == 1.0
    assert same["ce"] == pytest.approx(t["ce"], rel=1e-6)
    assert same["full_ece"] == pytest.approx(t["full_ece"], rel=1e-5)
    assert oth["ce"] == pytest.approx(ce_o, rel=1e-4)
    assert oth["kl"] == pytest.approx(kl_o, rel=1e-4) and oth["kl"] > 0.01
    assert oth["top1_agreement"] == pytest.approx(agree_o)
    assert set(t["tail_mass"]) == {"1", "2", "5", "10", "20", "50"}
    tails = [t["tail_mass"][k] for k in ("1", "2", "5", "10", "20", "50")]
    assert all(0 < a < 1 for a in tails) and tails == sorted(tails, reverse=True)
    assert t["mismatch_rate"] == pytest.approx(1 - t["top1_accuracy"])
    for s in (same, oth):
        assert all(math.isfinite(s[k]) for k in ("kl", "ce", "ppl", "full_ece", "top1_agreement"))
    # what made it: the settings that change the figures, the data's fingerprint, versions
    assert report["settings"] == {
        "dtype": "fp32", "device": "cpu", "document_mask": False, "vocab_alignment": "exact",
        "teacher_id_merges": None,
        "batch_size": 3, "max_batches": None, "chunk_size": 1024, "num_bins": 10,
        "tail_ks": [1, 2, 5, 10, 20, 50], "seed": 0}
    assert report["dataset_fingerprint"] == blocks.fingerprint
    assert report["provenance"]["torch"] == torch.__version__
    assert set(report["provenance"]) == {"tad_torchtune", "torch", "torchtune", "host", "created"}


@pytest.mark.skipif(not (DEMO / "tokenizer.json").is_file(), reason="demo tokenizer not built")
def test_document_mask_evaluates_each_document_alone(tmp_path):
    """document_mask: true: every document of a block is scored as transformers scores it run
    alone (the attention and positions of tad_distill's document_mask), and the KL differs from
    the unmasked one (the held-out blocks hold document boundaries)."""
    teacher = save_hf_llama(tmp_path / "teacher", seed=0)
    other = save_hf_llama(tmp_path / "other", seed=1, tied=True)
    data = write_corpus(tmp_path / "held_out.jsonl")
    dataset = held_out_dataset(data)
    reports = {}
    for masked in (True, False):
        out = tmp_path / f"out_{masked}"
        cfg = write_config(
            tmp_path / f"eval_{masked}.yaml", output_dir=str(out), tokenizer=tokenizer_cfg(),
            dataset=dataset, teacher={"checkpoint_dir": str(teacher)},
            students={"other": {"checkpoint_dir": str(other)}}, document_mask=masked)
        run_tune("--config", str(cfg))
        reports[masked] = json.loads((out / "eval.json").read_text())["students"]["other"]

    blocks = held_out_blocks(data)
    hf_t = transformers.LlamaForCausalLM.from_pretrained(teacher).eval()
    hf_o = transformers.LlamaForCausalLM.from_pretrained(other).eval()

    def alone(model, tokens, docs):  # each document's logits from a run of it alone
        return torch.cat([model(tokens[docs == d][None]).logits[0] for d in docs.unique()])

    kl, ce, crossing = [], [], 0
    with torch.no_grad():
        for i in range(len(blocks)):
            x, docs = blocks[i]["tokens"], torch.as_tensor(blocks[i]["document_ids"])
            crossing += int(docs.max()) > 0
            lt, lo = alone(hf_t, x, docs)[:-1], alone(hf_o, x, docs)[:-1]
            log_p, log_q = lt.log_softmax(-1), lo.log_softmax(-1)
            kl.append((log_p.exp() * (log_p - log_q)).sum(-1))
            ce.append(torch.nn.functional.cross_entropy(lo, x[1:], reduction="none"))
    assert crossing >= 2  # blocks of several documents: the mask changes something
    assert reports[True]["kl"] == pytest.approx(torch.cat(kl).mean().item(), rel=1e-4)
    assert reports[True]["ce"] == pytest.approx(torch.cat(ce).mean().item(), rel=1e-4)
    assert abs(reports[True]["kl"] - reports[False]["kl"]) > 1e-3 * reports[False]["kl"]


@pytest.mark.skipif(not (DEMO / "teacher" / "model.safetensors").is_file(),
                    reason="demo teacher not built")
def test_bundled_config_by_name(tmp_path):
    """``--config demo_eval`` resolves to the shipped config; the bundled teacher against itself."""
    out = tmp_path / "out"
    run_tune("--config", "demo_eval", f"output_dir={out}", f"students.self.checkpoint_dir={DEMO / 'teacher'}",
             "max_batches=1", "batch_size=2")
    report = json.loads((out / "eval.json").read_text())
    assert report["students"]["self"]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert report["students"]["self"]["num_tokens"] == 2 * 255
    assert 0.0 < report["teacher"]["mismatch_rate"] < 1.0


def test_tad_eval_errors_are_one_line(assets, tmp_path):
    cfg = tune.base_config(assets, tmp_path)
    eval_cfg = {"output_dir": str(tmp_path / "eval"), "tokenizer": cfg["tokenizer"],
                "dataset": cfg["validation_dataset"],
                "teacher": {"checkpoint_dir": str(assets["teacher"])},
                "students": {"s": {"checkpoint_dir": str(tmp_path / "no_student")}}}
    proc = tune.run_tune(["tad_eval", "--config", str(tune.write_config(eval_cfg, tmp_path / "e.yaml"))],
                         cwd=tmp_path, check=False)
    assert tune.one_error_line(proc) == (f"tad_eval: error: students.s.checkpoint_dir: "
                               f"{str(tmp_path / 'no_student')!r} is not a folder; accepted: a "
                               f"Hugging Face checkpoint folder")


def test_tad_eval_on_several_processes_is_refused_in_one_line(assets, tmp_path, monkeypatch,
                                                               capsys):
    """Launched with --nproc_per_node, every process would evaluate everything and write the
    same files: refused before anything loads."""
    cfg = tune.base_config(assets, tmp_path)
    eval_cfg = {"output_dir": str(tmp_path / "eval"), "tokenizer": cfg["tokenizer"],
                "dataset": cfg["validation_dataset"],
                "teacher": {"checkpoint_dir": str(assets["teacher"])},
                "students": {"s": {"checkpoint_dir": str(assets["teacher"])}}}
    monkeypatch.setenv("WORLD_SIZE", "2")
    line = tune.user_error("tad_eval", ["--config", str(tune.write_config(
        eval_cfg, tmp_path / "e.yaml"))], monkeypatch, capsys)
    assert line == ("tad_eval: error: --nproc_per_node: tad_eval runs in one process, got 2 "
                    "(WORLD_SIZE=2); run it without --nproc_per_node")
    assert not (tmp_path / "eval").exists()


def test_every_folder_is_checked_before_a_model_loads(assets, tmp_path, monkeypatch, capsys):
    """A student folder without config.json is reported before the teacher loads: here the
    teacher's config names a model no family builds, an error only its loading finds, which
    came first before."""
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(assets["teacher"], teacher)
    hf = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**hf, "model_type": "no_such_family"}))
    cfg = tune.base_config(assets, tmp_path)
    eval_cfg = {"output_dir": str(tmp_path / "eval"), "tokenizer": cfg["tokenizer"],
                "dataset": cfg["validation_dataset"], "teacher": {"checkpoint_dir": str(teacher)},
                "students": {"s": {"checkpoint_dir": str(assets["teacher"])},
                             "t": {"checkpoint_dir": str(tmp_path / "no_student")}}}
    args = ["--config", str(tune.write_config(eval_cfg, tmp_path / "e.yaml"))]
    line = tune.user_error("tad_eval", args, monkeypatch, capsys)
    assert line == (f"tad_eval: error: students.t.checkpoint_dir: "
                    f"{str(tmp_path / 'no_student')!r} is not a folder; accepted: a Hugging "
                    f"Face checkpoint folder")
    (tmp_path / "no_student").mkdir()  # the teacher's own error, once the students are right
    shutil.copy(assets["teacher"] / "config.json", tmp_path / "no_student")
    shutil.copy(assets["teacher"] / "model.safetensors", tmp_path / "no_student")
    line = tune.user_error("tad_eval", args, monkeypatch, capsys)
    assert line.startswith("tad_eval: error: teacher.checkpoint_dir: ") and "no_such_family" in line


def test_what_the_models_cannot_take_is_one_line_before_they_load(assets, tmp_path, monkeypatch,
                                                                   capsys):
    """An output_dir that is a file (found after the whole evaluation before), a typo in a
    folder's entry (ignored before), rows longer than the models take and a student of another
    vocabulary (tracebacks before, or a line naming no key)."""
    cfg = tune.base_config(assets, tmp_path)
    base = {"output_dir": str(tmp_path / "eval"), "tokenizer": cfg["tokenizer"],
            "dataset": cfg["validation_dataset"],
            "teacher": {"checkpoint_dir": str(assets["teacher"])},
            "students": {"s": {"checkpoint_dir": str(assets["teacher"])}}}
    (tmp_path / "a_file").write_text("")
    small = save_hf_llama(tmp_path / "small_vocab", seed=0, vocab=128)

    def line(**changes):
        eval_cfg = {**base, **changes}
        return tune.user_error("tad_eval", ["--config", str(tune.write_config(
            eval_cfg, tmp_path / "e.yaml"))], monkeypatch, capsys)

    assert line(output_dir=str(tmp_path / "a_file")) == (
        f"tad_eval: error: output_dir: {str(tmp_path / 'a_file')!r} is a file; it must be a "
        f"folder or not exist")
    assert line(students={"s": {"chekpoint_dir": str(assets["teacher"])}}) == (  # misspelt
        "tad_eval: error: students.s.chekpoint_dir: not a key of a checkpoint folder's entry; "
        "accepted: checkpoint_dir, checkpoint_files, model, model_type")
    assert line(students={"s": {"checkpoint_dir": str(assets["teacher"]),
                                "checkpoint_dirr": "/x"}}) == (
        "tad_eval: error: students.s.checkpoint_dirr: not a key of a checkpoint folder's entry; "
        "accepted: checkpoint_dir, checkpoint_files, model, model_type")
    # a training config's checkpointer node as a folder's entry: its own keys are not typos
    checkpointer = {**cfg["teacher_checkpointer"], "checkpoint_dirr": "/x"}
    assert line(teacher=checkpointer) == (
        "tad_eval: error: teacher.checkpoint_dirr: not a key of a checkpoint folder's entry; "
        "accepted: checkpoint_dir, checkpoint_files, model, model_type")
    assert line(dataset={**base["dataset"], "max_seq_len": 100}) == (
        "tad_eval: error: dataset.max_seq_len: rows of 100 tokens, but the models take at most "
        "64 (their max_seq_len); accepted: at most 64")
    assert line(students={"small": {"checkpoint_dir": str(small)}}).startswith(
        "tad_eval: error: students.small: vocabulary size mismatch: teacher has 256 ids, student "
        "has 128")
    # tail_ks that are not integers >= 1 (2.5 was read as 2, true as 1), or not below the
    # vocabulary (found at the first batch, naming ks)
    for bad, shown in (([1, 2.5], "[1, 2.5] holds 2.5"), ([True], "[True] holds True"),
                       (["a"], "['a'] holds 'a'"), ([0, 2], "[0, 2] holds 0"), ([], "[] is empty")):
        assert line(tail_ks=bad) == (f"tad_eval: error: tail_ks: {shown}; accepted: a list of "
                                     f"integers from 1 to the vocabulary size - 1")
    assert line(tail_ks=[1, 5, 256]) == ("tad_eval: error: tail_ks: 256 is not below the "
                                         "vocabulary of 256 ids; accepted: integers from 1 to 255")
    # a model_type without a model: checked against config.json (ignored before)
    assert line(teacher={"checkpoint_dir": str(assets["teacher"]), "model_type": "QWEN2"}
                ).startswith("tad_eval: error: teacher.model_type: QWEN2 converts the weights of "
                             "Hugging Face model_type 'qwen2', but ")
    # a tad_distill training checkpoint: pointed to its exports
    step = tmp_path / "run" / "checkpoints" / "step_000006"
    step.mkdir(parents=True)
    (step / "meta.pt").write_bytes(b"")
    assert line(students={"s": {"checkpoint_dir": str(step)}}) == (
        f"tad_eval: error: students.s.checkpoint_dir: {str(step)!r} has no config.json; it is a "
        f"tad_distill training checkpoint (for resuming); accepted: its Hugging Face export "
        f"{str(step / 'hf')!r} (written when export_hf: true), or the run's output_dir/student")
    assert not (tmp_path / "eval").exists()


@pytest.mark.skipif(not (DEMO / "tokenizer.json").is_file(), reason="demo tokenizer not built")
def test_a_truncated_teacher_s_own_metrics_are_of_the_truncated_distribution(tmp_path,
                                                                             monkeypatch):
    """With truncate_teacher the teacher's logits are cut to the students' vocabulary before
    any softmax: its CE, Full-ECE and tail masses are those of the teacher without the padded
    ids, of which the students' KL is measured (before, its own row used the whole softmax)."""
    from safetensors.torch import load_file, save_file

    small = save_hf_llama(tmp_path / "teacher", seed=0)  # 2048 ids
    padded = tmp_path / "padded"
    padded.mkdir()
    weights = load_file(small / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):  # 64 ids more, of some mass
        weights[key] = torch.cat([weights[key], torch.randn(64, 32, generator=g)])
    save_file(weights, padded / "model.safetensors", metadata={"format": "pt"})
    hf = json.loads((small / "config.json").read_text())
    (padded / "config.json").write_text(json.dumps({**hf, "vocab_size": 2112}))
    student = save_hf_llama(tmp_path / "student", seed=2)
    data = write_corpus(tmp_path / "held_out.jsonl")
    reports = {}
    for name, teacher, alignment in (("small", small, "exact"),
                                     ("padded", padded, "truncate_teacher")):
        cfg = write_config(
            tmp_path / f"{name}.yaml", output_dir=str(tmp_path / name), tokenizer=tokenizer_cfg(),
            dataset=held_out_dataset(data), teacher={"checkpoint_dir": str(teacher)},
            students={"s": {"checkpoint_dir": str(student)}}, vocab_alignment=alignment)
        tune.run_in_process("tad_eval", ["--config", str(cfg)], monkeypatch)
        reports[name] = json.loads((tmp_path / name / "eval.json").read_text())
    small, padded = reports["small"], reports["padded"]
    for key in ("ce", "full_ece", "mismatch_rate"):
        assert padded["teacher"][key] == pytest.approx(small["teacher"][key], rel=1e-5), key
    for k, v in small["teacher"]["tail_mass"].items():
        assert padded["teacher"]["tail_mass"][k] == pytest.approx(v, rel=1e-5), k
    assert padded["students"]["s"]["kl"] == pytest.approx(small["students"]["s"]["kl"], rel=1e-5)


@pytest.mark.skipif(not (DEMO / "tokenizer.json").is_file(), reason="demo tokenizer not built")
def test_merged_teacher_ids_are_scored_as_added_probabilities(tmp_path, monkeypatch,
                                                              capsys):
    """``teacher_id_merges``: the teacher's padded ids' probabilities are added to their
    targets' before the cut, for its own metrics and the students' KL, against transformers'
    logits of the padded teacher merged by hand; the setting is recorded."""
    from safetensors.torch import load_file, save_file

    small = save_hf_llama(tmp_path / "teacher", seed=0)  # 2048 ids
    padded = tmp_path / "padded"
    padded.mkdir()
    weights = load_file(small / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):  # 64 ids more
        weights[key] = torch.cat([weights[key], torch.randn(64, 32, generator=g)])
    merges = {2048: 5, 2050: 5, 2060: 17}
    weights["lm_head.weight"][list(merges)] *= 6.0  # ids with much of the mass
    save_file(weights, padded / "model.safetensors", metadata={"format": "pt"})
    hf = json.loads((small / "config.json").read_text())
    (padded / "config.json").write_text(json.dumps({**hf, "vocab_size": 2112}))
    student = save_hf_llama(tmp_path / "student", seed=2)
    data = write_corpus(tmp_path / "held_out.jsonl")
    cfg = write_config(
        tmp_path / "merged.yaml", output_dir=str(tmp_path / "merged"), tokenizer=tokenizer_cfg(),
        dataset=held_out_dataset(data), teacher={"checkpoint_dir": str(padded)},
        students={"s": {"checkpoint_dir": str(student)}}, vocab_alignment="truncate_teacher",
        teacher_id_merges=merges)
    tune.run_in_process("tad_eval", ["--config", str(cfg)], monkeypatch)
    report = json.loads((tmp_path / "merged" / "eval.json").read_text())

    blocks = held_out_blocks(data)
    x = torch.stack([blocks[i]["tokens"] for i in range(len(blocks))])
    with torch.no_grad():
        lt = transformers.LlamaForCausalLM.from_pretrained(padded).eval()(x).logits[:, :-1]
        ls = transformers.LlamaForCausalLM.from_pretrained(student).eval()(x).logits[:, :-1]
    p_full = lt.double().softmax(-1)
    p = p_full[..., :2048].clone()
    for source, target in merges.items():
        p[..., target] += p_full[..., source]
    assert float(p_full[..., list(merges)].sum(-1).mean()) > 0.05  # the merges matter
    p /= p.sum(-1, keepdim=True)
    log_q = ls.double().log_softmax(-1)
    y = x[:, 1:]
    ce_t = -p.log().gather(-1, y.unsqueeze(-1)).mean().item()
    kl = (p * (p.log() - log_q)).sum(-1).mean().item()
    assert report["teacher"]["ce"] == pytest.approx(ce_t, rel=1e-4)
    assert report["students"]["s"]["kl"] == pytest.approx(kl, rel=1e-4)
    assert report["settings"]["teacher_id_merges"] == {str(k): v for k, v in merges.items()}

    # a mistake is one line naming the key, before any model loads
    import tad_eval

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(tad_eval, "load_hf_folder", load)
    bad = write_config(
        tmp_path / "bad.yaml", output_dir=str(tmp_path / "bad"), tokenizer=tokenizer_cfg(),
        dataset=held_out_dataset(data), teacher={"checkpoint_dir": str(padded)},
        students={"s": {"checkpoint_dir": str(student)}}, vocab_alignment="truncate_teacher",
        teacher_id_merges={5: 2})
    capsys.readouterr()
    with pytest.raises(SystemExit):
        tune.run_in_process("tad_eval", ["--config", str(bad)], monkeypatch)
    assert capsys.readouterr().err.splitlines()[-1] == (
        "tad_eval: error: teacher_id_merges.5: not past the student's 2048 ids within the "
        "teacher's 2112; accepted: teacher ids from 2048 to 2111 (an id the student has keeps "
        "its own probability)")
    # sizes that cannot be aligned: the student's own line, before any model loads too
    exact = write_config(
        tmp_path / "exact.yaml", output_dir=str(tmp_path / "exact"), tokenizer=tokenizer_cfg(),
        dataset=held_out_dataset(data), teacher={"checkpoint_dir": str(padded)},
        students={"s": {"checkpoint_dir": str(student)}})
    with pytest.raises(SystemExit):
        tune.run_in_process("tad_eval", ["--config", str(exact)], monkeypatch)
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        "tad_eval: error: students.s: vocabulary size mismatch: teacher has 2112 ids, student "
        "has 2048 (vocab_alignment='exact'); set vocab_alignment='truncate_teacher'")


def test_the_summary_table_keeps_its_columns_apart():
    """A perplexity of millions (random models) ran into the CE before it: every value now
    follows a space."""
    from tad_eval import summary_table

    metrics = {"ce": 14.7565, "ppl": 2562585.79, "full_ece": 0.5, "kl": 12.5,
               "top1_agreement": 0.01}
    report = {"teacher": {**metrics, "tail_mass": {"1": 0.5}, "mismatch_rate": 0.9},
              "students": {"s": metrics}}
    rows = summary_table(report).splitlines()
    assert rows[0].split() == ["model", "KL", "CE", "ppl", "Full-ECE", "top1", "agr"]
    assert rows[1].split() == ["teacher", "14.7565", "2562585.79", "0.5000"]
    assert rows[2].split() == ["s", "12.5000", "14.7565", "2562585.79", "0.5000", "0.0100"]
    assert len(rows[0]) == 16 + 9 + 9 + 10 + 10 + 10  # the widths of before, for usual values


@pytest.mark.skipif(not (DEMO / "tokenizer.json").is_file(), reason="demo tokenizer not built")
def test_a_teacher_tokenizer_is_checked_as_tad_distill_checks_it(tmp_path, monkeypatch, capsys):
    """``teacher_tokenizer``: the same tokenizer gives the same report and no warning; one that
    maps shared ids to other tokens is one line naming the key, before any model loads."""
    teacher = save_hf_llama(tmp_path / "teacher", seed=0)
    student = save_hf_llama(tmp_path / "student", seed=2)
    data = write_corpus(tmp_path / "held_out.jsonl")
    swapped = json.loads((DEMO / "tokenizer.json").read_text())
    vocab = swapped["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tmp_path / "swapped.json").write_text(json.dumps(swapped))
    reports = {}
    for name, teacher_tokenizer in (("plain", None), ("same", tokenizer_cfg()),
                                    ("swapped", {**tokenizer_cfg(),
                                                 "tokenizer_json_path": str(tmp_path / "swapped.json")})):
        cfg = write_config(
            tmp_path / f"{name}.yaml", output_dir=str(tmp_path / name), tokenizer=tokenizer_cfg(),
            dataset=held_out_dataset(data), teacher={"checkpoint_dir": str(teacher)},
            students={"s": {"checkpoint_dir": str(student)}},
            **({"teacher_tokenizer": teacher_tokenizer} if teacher_tokenizer else {}))
        capsys.readouterr()
        if name == "swapped":
            import tad_eval

            def load(*args, **kwargs):
                raise AssertionError("a model was loaded before the tokenizers were checked")

            monkeypatch.setattr(tad_eval, "load_hf_folder", load)
            with pytest.raises(SystemExit):
                tune.run_in_process("tad_eval", ["--config", str(cfg)], monkeypatch)
            line = capsys.readouterr().err.splitlines()[-1]
            assert line.startswith("tad_eval: error: teacher_tokenizer: teacher tokenizer "
                                   "(HuggingFaceBaseTokenizer) and student tokenizer "
                                   "(HuggingFaceBaseTokenizer) disagree on 2 of the "), line
            continue
        tune.run_in_process("tad_eval", ["--config", str(cfg)], monkeypatch)
        assert "warning" not in capsys.readouterr().err
        reports[name] = json.loads((tmp_path / name / "eval.json").read_text())
    assert reports["same"]["students"] == reports["plain"]["students"]


def test_merges_with_a_soft_capping_teacher_are_refused_before_any_model_loads(
        tmp_path, monkeypatch, capsys):
    """Gemma2's logit soft-cap, read from the teacher folder's config.json on a meta build:
    one line, before any model loads."""
    import tad_eval

    from tests.helpers.teachers import VOCAB as V, hf_config

    hf = {**hf_config("gemma2")}
    hf.pop("model_type")
    for name, vocab in (("teacher", V + 8), ("student", V)):
        config = transformers.Gemma2Config(**{**hf, "vocab_size": vocab})
        transformers.Gemma2ForCausalLM(config).save_pretrained(tmp_path / name)

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the merges were checked")

    monkeypatch.setattr(tad_eval, "load_hf_folder", load)
    cfg = write_config(
        tmp_path / "eval.yaml", output_dir=str(tmp_path / "out"), tokenizer=tokenizer_cfg(),
        dataset=held_out_dataset(write_corpus(tmp_path / "held_out.jsonl")),
        teacher={"checkpoint_dir": str(tmp_path / "teacher")},
        students={"s": {"checkpoint_dir": str(tmp_path / "student")}},
        vocab_alignment="truncate_teacher", teacher_id_merges={V + 1: 3})
    with pytest.raises(SystemExit):
        tune.run_in_process("tad_eval", ["--config", str(cfg)], monkeypatch)
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        f"tad_eval: error: teacher_id_merges: {{{V + 1}: 3}} with a teacher that soft-caps its "
        f"logits (")
