"""``tune run tad_prepare`` end to end: the demo config, and a prepare killed midway."""

import gzip
import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import tune

pytestmark = pytest.mark.slow
DEMO_CORPUS = Path(__file__).parents[2] / "tad_torchtune" / "assets" / "demo" / "jargon.jsonl.gz"


def test_demo_config_builds_one_store_for_both_datasets_then_reports_it(tmp_path, monkeypatch,
                                                                       capsys):
    env_dir = tmp_path / "stores"
    args = ["tad_prepare", "--config", "demo", f"dataset.store_dir={env_dir}",
            f"validation_dataset.store_dir={env_dir}", "num_workers=2"]
    first = tune.run_tune(args, cwd=tmp_path).stdout
    stores = [p for p in env_dir.iterdir() if not p.name.startswith(".")]
    assert len(stores) == 1
    manifest = json.loads((stores[0] / "manifest.json").read_text())
    assert (manifest["num_tokens"], manifest["num_documents"]) == (515_859, 2497)
    assert first.count(f"tad_prepare: dataset: built: {stores[0]}\n") == 1
    assert f"  515,859 tokens, 2,497 documents, 1 file(s), uint16, fingerprint {manifest['fingerprint'][:16]}\n" in first
    assert ("tokens/s (batch engine); num_workers=2 not used: the Hugging Face tokenizer "
            "encodes on every core itself (RAYON_NUM_THREADS limits it)\n") in first
    assert f"tad_prepare: validation_dataset: already built (the same store as dataset): {stores[0]}\n" in first
    capsys.readouterr()
    tune.run_in_process("tad_prepare", ["--config", str(tune.bundled_config_path("demo")),
                                        *args[3:]], monkeypatch)  # again, in this process
    second = capsys.readouterr().out
    assert f"tad_prepare: dataset: already built: {stores[0]}\n" in second and ": built:" not in second
    assert json.loads((stores[0] / "manifest.json").read_text()) == manifest  # not rebuilt
    # under torchrun the other ranks find the store rank 0's node built and report nothing
    monkeypatch.setenv("RANK", "1")
    tune.run_in_process("tad_prepare", ["--config", str(tune.bundled_config_path(
        "demo")), *args[3:]], monkeypatch)
    assert capsys.readouterr().out == ""


def test_config_errors(tmp_path, monkeypatch, capsys):
    cfg = tune.write_config({"tokenizer": {"_component_": "tad_torchtune.demo.demo_tokenizer"},
                             "dataset": {"_component_": "torchtune.datasets.text_completion_dataset"}},
                            tmp_path / "c.yaml")
    proc = tune.run_tune(["tad_prepare", "--config", str(cfg)], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        "tad_prepare: error: dataset._component_: tad_prepare builds the token stores of "
        "tad_torchtune.data.text_block_dataset, got 'torchtune.datasets.text_completion_dataset'")
    line = tune.user_error("tad_prepare", ["--config", str(tune.bundled_config_path("demo")),
                                           "num_workers=0"], monkeypatch, capsys)
    assert line == "tad_prepare: error: num_workers: must be an integer >= 1 or null, got 0"


def test_sigkill_midway_leaves_no_store_and_the_next_run_builds_it(tmp_path, monkeypatch, capsys):
    copies = 6  # ~3M tokens: seconds of tokenizing, the kill lands after the first batch
    demo = DEMO_CORPUS.read_bytes()
    corpus = tmp_path / "big.jsonl"
    corpus.write_bytes(gzip.decompress(demo) * copies)
    stores = tmp_path / "stores"
    cfg = tune.write_config({
        "tokenizer": {"_component_": "tad_torchtune.demo.demo_tokenizer"},
        "dataset": {"_component_": "tad_torchtune.data.text_block_dataset", "source": str(corpus),
                    "max_seq_len": 128, "store_dir": str(stores)},
    }, tmp_path / "c.yaml")
    cmd = [tune.tune_bin(), "run", "tad_prepare", "--config", str(cfg)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not any(t.stat().st_size > 0 for t in stores.glob(".tmp-*/tokens.bin")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no temporary store appeared"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in stores.iterdir() if not p.name.startswith(".")] == []
    assert len(list(stores.glob(".tmp-*"))) == 1  # the killed build's leftovers, ignored

    capsys.readouterr()
    tune.run_in_process("tad_prepare", ["--config", str(cfg)], monkeypatch)  # in this process
    out = capsys.readouterr().out
    built = [p for p in stores.iterdir() if not p.name.startswith(".")]
    assert len(built) == 1 and f"tad_prepare: dataset: built: {built[0]}" in out
    assert list(stores.glob(".tmp-*")) == []  # removed by the build that followed
    manifest = json.loads((built[0] / "manifest.json").read_text())
    assert manifest["num_tokens"] == copies * 515_859
    tokens = (built[0] / "tokens.bin").read_bytes()
    assert manifest["tokens_sha256"] == hashlib.sha256(tokens).hexdigest()
    from tad_torchtune.data import prepare_store
    from tad_torchtune.demo import demo_tokenizer

    demo_store, _ = prepare_store(str(DEMO_CORPUS), demo_tokenizer(), progress=False)
    assert tokens == demo_store.tokens.tobytes() * copies
