"""lm-evaluation-harness support: the windows of ``tad_torchtune.harness`` against lm_eval's own,
the shipped task, the ``tad_eleuther_eval`` wrapper against lm_eval's ``HFLM``, and end to end
a demo student scored by torchtune's recipe, by lm_eval's Hugging Face model and by ``tad_eval``.
"""

import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import zlib
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

lm_eval_utils = pytest.importorskip("lm_eval.utils")
transformers = pytest.importorskip("transformers")

from tad_torchtune.data import resolve_asset  # noqa: E402
from tad_torchtune.demo import demo_tokenizer  # noqa: E402
from tad_torchtune.harness import (  # noqa: E402
    IGNORE_INDEX,
    TASKS_DIR,
    RollingWindowDataset,
    rolling_windows,
)

DEMO = Path(resolve_asset("pkg://demo"))
HELD_OUT = TASKS_DIR / "jargon_heldout.jsonl"
BIN = Path(sys.executable).parent
# no Hub, no data set hub: everything below is local, and must stay so
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def lm_eval_windows(tokens, prefix_id, max_length):
    return [lm_eval_utils.make_disjoint_window(w) for w in lm_eval_utils.get_rolling_token_windows(
        token_list=tokens, prefix_token=prefix_id, max_seq_len=max_length, context_len=1)]


@pytest.mark.parametrize("max_length", [1, 2, 5, 16])
def test_rolling_windows_are_lm_evals(max_length):
    for n in sorted({0, 1, 2, 3, 47, max_length - 1, max_length, max_length + 1, 2 * max_length,
                     2 * max_length + 1, 3 * max_length - 1}):
        tokens = list(range(100, 100 + n))
        ours = rolling_windows(tokens, prefix_id=7, max_length=max_length)
        assert ours == [(list(c), list(t)) for c, t in lm_eval_windows(tokens, 7, max_length)], n
        assert [x for _, cont in ours for x in cont] == tokens  # each token predicted once
        assert all(len(c) + len(t) - 1 <= max_length for c, t in ours)


def test_rolling_window_dataset_scores_what_lm_eval_scores(tmp_path):
    """After ``tad_eval``'s left shift of the labels, position t is scored on exactly the tokens
    lm_eval scores, each from the same preceding tokens as lm_eval's model input."""
    tok = demo_tokenizer()
    docs = ["a kludge", "the wizard grepped the source for a bug " * 9, "frob " * 40]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    L = 16
    data = RollingWindowDataset(tok, source=str(source), max_length=L)
    expected = [w for d in docs for w in lm_eval_windows(tok.encode(d, add_bos=False, add_eos=False),
                                                         tok.bos_id, L)]
    assert len(data) == len(expected) and len(expected) > len(docs)
    for sample, (context, cont) in zip(data, expected):
        tokens, labels = sample["tokens"], sample["labels"]
        assert len(tokens) == len(labels) == L + 1
        shifted = labels[1:] + [IGNORE_INDEX]  # what tad_eval scores position t on
        scored = [t for t, y in enumerate(shifted) if y != IGNORE_INDEX]
        inp = (list(context) + list(cont))[-(L + 1):][:-1]  # lm_eval's model input
        assert scored == list(range(len(inp) - len(cont), len(inp)))
        assert [shifted[t] for t in scored] == list(cont)
        assert tokens[: len(inp)] == inp and set(tokens[len(inp) + 1:]) <= {tok.pad_id}
    assert len(RollingWindowDataset(tok, source=str(source), max_length=L, max_documents=1)) == 1
    with pytest.raises(ValueError, match="dataset.max_length must be an integer >= 1, got 0"):
        RollingWindowDataset(tok, source=str(source), max_length=0)


def test_shipped_task_is_the_held_out_documents():
    from lm_eval.tasks import TaskManager, get_task_dict

    with gzip.open(DEMO / "jargon.jsonl.gz", "rt", encoding="utf-8") as f:
        corpus = [json.loads(line)["text"] for line in f]
    held_out = [d for d in corpus if zlib.crc32(d.encode("utf-8")) % 15 == 0]
    assert len(held_out) == 179
    assert [json.loads(line)["text"] for line in HELD_OUT.read_text(encoding="utf-8").splitlines()] \
        == held_out
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    task = get_task_dict(["jargon_heldout"], manager)["jargon_heldout"]
    assert task.OUTPUT_TYPE == "loglikelihood_rolling"
    assert [task.doc_to_target(d) for d in task.test_docs()] == held_out
    assert sorted(task.aggregation()) == ["bits_per_byte", "byte_perplexity", "word_perplexity"]


def test_student_wrapper_sets_up_what_hflm_does_and_scores_like_it():
    """``StudentEvalWrapper`` loads no Hugging Face model, yet has every attribute lm_eval's
    ``HFLM`` sets up, the demo BOS as prefix token, and gives the same rolling log-likelihoods
    as ``HFLM`` on the same (teacher) weights."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from tad_eleuther_eval import StudentEvalWrapper

    from tad_torchtune.models import hf_decoder, load_hf_checkpoint

    teacher_dir = str(DEMO / "teacher")
    hf = HFLM(pretrained=teacher_dir, device="cpu", batch_size=4, dtype="float32")
    model = hf_decoder(teacher_dir)  # as the eleuther_eval_student config builds it
    load_hf_checkpoint(model, teacher_dir, model_type="LLAMA3")
    ours = StudentEvalWrapper(model.eval(), demo_tokenizer(), device="cpu", max_seq_length=256,
                              batch_size=4)
    assert set(vars(hf)) - {"accelerator"} <= set(vars(ours))
    assert ours.prefix_token_id == hf.prefix_token_id == 0 and ours.max_length == hf.max_length
    docs = [json.loads(line)["text"] for line in HELD_OUT.read_text().splitlines()[:3]]
    requests = [Instance("loglikelihood_rolling", doc={}, arguments=(d,), idx=i)
                for i, d in enumerate(docs)]
    with torch.no_grad():
        theirs, mine = hf.loglikelihood_rolling(requests), ours.loglikelihood_rolling(requests)
    assert mine == pytest.approx(theirs, rel=1e-5) and min(theirs) < -500


def _start(*cmd, cwd, log, env):
    with open(log, "w") as f:
        return subprocess.Popen([str(BIN / cmd[0]), *cmd[1:]], cwd=cwd, stdout=f,
                                stderr=subprocess.STDOUT, env=env)


def _wait(proc, log, timeout=400):
    assert proc.wait(timeout=timeout) == 0, Path(log).read_text()[-4000:]


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO / "teacher" / "model.safetensors").is_file(),
                    reason="demo teacher not built")
def test_demo_student_perplexity_agrees_across_harness_paths(tmp_path):
    """A demo student trained for 3 steps and exported by ``tad_distill`` is self-contained, and
    its log-likelihood of the first DOCS held-out documents is the same from torchtune's harness
    recipe (``tad_eleuther_eval``), from lm_eval's Hugging Face model (``lm_eval --model hf``) and
    from ``tad_eval`` on ``rolling_window_dataset``: the same windows of L = 255 tokens (tad_eval
    predicts T - 1 tokens of a T-token block, and the student takes at most 256 positions), the
    same contexts, hence the same tokens scored. Total log-likelihoods agree to 1e-6 relative
    (measured: 2e-9 on all 179 documents); the differences are float32 rounding of the logits
    and of lm_eval's per-window sums, transformers' implementation against torchtune's."""
    DOCS, L = 40, 255
    cwd = tmp_path / "cwd"  # an empty folder: nothing may be found from the current one
    cwd.mkdir()
    # offline, and datasets' cache of the local JSON file kept inside the test's folder
    env = os.environ | OFFLINE | {"HF_HOME": str(tmp_path / "hf_home")}
    _wait(_start("tune", "run", "tad_distill", "--config", "demo", "max_steps=3", "export_hf=true",
                 f"output_dir={tmp_path / 'run'}", cwd=cwd, log=tmp_path / "distill.log", env=env),
          tmp_path / "distill.log")

    # self-contained: the folder alone, away from the run, opens with the Auto classes
    student = Path(shutil.copytree(tmp_path / "run" / "student", tmp_path / "alone" / "student"))
    assert (student / "tokenizer_config.json").read_bytes() == \
        (DEMO / "teacher" / "tokenizer_config.json").read_bytes()
    hf_tok = transformers.AutoTokenizer.from_pretrained(student)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    ids = hf_tok("a kludge in the daemon")["input_ids"]  # the BOS first, as training's
    assert ids == demo_tokenizer().encode("a kludge in the daemon", add_bos=True, add_eos=False)
    assert (hf_tok.bos_token_id, hf_model.config.num_hidden_layers) == (0, 2)

    # the three scorers at once
    runs = {
        "ee.log": _start("tune", "run", "tad_eleuther_eval", "--config", "eleuther_eval_student",
                         f"student_dir={student}", f"output_dir={tmp_path / 'eleuther'}",
                         f"max_seq_length={L}", f"limit={DOCS}", cwd=cwd,
                         log=tmp_path / "ee.log", env=env),
        "hf.log": _start("lm_eval", "run", "--model", "hf", "--model_args",
                         # the export's tokenizer prepends training's BOS; a rolling task
                         # would score it after lm_eval's own BOS prefix (as with any tokenizer
                         # that adds one): without it, the same tokens as the other two
                         f"pretrained={student},dtype=float32,max_length={L},"
                         f"add_bos_token=False",
                         "--tasks", "jargon_heldout", "--include_path", str(TASKS_DIR),
                         "--device", "cpu", "--batch_size", "8", "--limit", str(DOCS),
                         "--output_path", str(tmp_path / "hf"), cwd=cwd,
                         log=tmp_path / "hf.log", env=env),
        "tad.log": _start("tune", "run", "tad_eval", "--config", "demo_eval",
                          f"output_dir={tmp_path / 'tad_eval'}",
                          f"students.student.checkpoint_dir={student}",
                          "dataset._component_=tad_torchtune.harness.rolling_window_dataset",
                          "dataset.source=pkg://lm_eval/jargon_heldout.jsonl",
                          f"dataset.max_length={L}", f"dataset.max_documents={DOCS}",
                          "~dataset.max_seq_len", "~dataset.split", "~dataset.validation_fraction",
                          cwd=cwd, log=tmp_path / "tad.log", env=env),
    }
    for log, proc in runs.items():
        _wait(proc, tmp_path / log)

    docs = [json.loads(line)["text"] for line in HELD_OUT.read_text().splitlines()[:DOCS]]
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    n_tokens = sum(len(demo_tokenizer().encode(d, add_bos=False, add_eos=False)) for d in docs)
    report = json.loads((tmp_path / "tad_eval" / "eval.json").read_text())["students"]["student"]
    assert report["num_tokens"] == n_tokens  # every token of every document, once
    ll_tad = -report["ce"] * n_tokens
    tune_results = json.loads((tmp_path / "eleuther" / "eleuther_results.json").read_text())
    hf_results = json.loads(next((tmp_path / "hf").glob("*/results_*.json")).read_text())
    for results in (tune_results, hf_results):
        res = results["results"]["jargon_heldout"]
        ll = -res["bits_per_byte,none"] * math.log(2) * n_bytes  # lm_eval: -LL / bytes / ln 2
        assert ll == pytest.approx(ll_tad, rel=1e-6)
        assert math.log(res["byte_perplexity,none"]) * n_bytes == pytest.approx(-ll, rel=1e-9)
    # what made tad_eleuther_eval's figures: the student, the settings, the versions
    assert tune_results["student"] == {"checkpoint_dir": str(student),
                                       "checkpoint_files": ["model.safetensors"],
                                       "model_type": "LLAMA2"}  # config.json's family
    assert {k: tune_results["settings"][k] for k in ("tasks", "limit", "max_seq_length")} == {
        "tasks": ["jargon_heldout"], "limit": DOCS, "max_seq_length": L}
    assert tune_results["provenance"]["lm_eval"] == version("lm-eval")
    assert "jargon_heldout" in tune_results["versions"]
    # token perplexity, as tad_eval reports it, from the harness's numbers
    assert math.exp(-ll / n_tokens) == pytest.approx(report["ppl"], rel=1e-5)
    assert 0 < report["ce"] < math.log(2048) + 1  # a real, if barely trained, model


def _bos_adding_demo_tokenizer(tmp_path):
    """The demo tokenizer as a ``HuggingFaceBaseTokenizer`` on an export's tokenizer.json,
    whose post-processor prepends the BOS (``save_hf_checkpoint(add_bos_id=...)``; a Llama 3
    tokenizer.json does the same): torchtune's ``encode(add_bos=False)`` keeps that BOS."""
    from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer

    from tad_torchtune.models._export import _prepend_bos

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(DEMO / name, tmp_path / name)
    assert _prepend_bos(tmp_path, demo_tokenizer().bos_id) is None
    tok = HuggingFaceBaseTokenizer(str(tmp_path / "tokenizer.json"),
                                   tokenizer_config_json_path=str(tmp_path / "tokenizer_config.json"))
    assert tok.encode("a kludge", add_bos=False, add_eos=False)[0] == tok.bos_id  # the premise
    return tok


def test_text_alone_is_encoded_without_the_bos_a_tokenizer_json_adds(tmp_path):
    """``encode_text`` (the rolling windows of ``tad_eval`` and ``tad_eleuther_eval``, the
    teacher-tokenizer probe) gives the demo tokenizer's ids of the text alone, whether the
    tokenizer.json adds the BOS or torchtune does; the windows built on either are the same."""
    from tad_eleuther_eval import StudentEvalWrapper

    from tad_torchtune.models import hf_decoder
    from tad_torchtune.vocab import encode_text, tokenizer_warnings

    ours, plain = _bos_adding_demo_tokenizer(tmp_path), demo_tokenizer()
    for text in ("a kludge in the daemon", "", " hacker\n\nethic "):
        expected = plain.encode(text, add_bos=False, add_eos=False)
        assert encode_text(ours, text) == encode_text(plain, text) == expected
    assert tokenizer_warnings(ours, plain, 2048, "exact") == []
    windows = {name: RollingWindowDataset(tok, source=str(HELD_OUT), max_length=64,
                                          max_documents=3).samples
               for name, tok in (("ours", ours), ("plain", plain))}
    assert windows["ours"] == windows["plain"]
    wrapper = StudentEvalWrapper(hf_decoder(str(DEMO / "teacher")), ours, device="cpu")
    assert wrapper.tok_encode("a kludge in the daemon") == \
        plain.encode("a kludge in the daemon", add_bos=False, add_eos=False)
