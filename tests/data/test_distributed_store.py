"""Two processes under torchrun open a dataset whose store is missing: it is built once, by
rank 0, and both read the same blocks."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data.reference import DEMO_CORPUS

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("open_store_distributed.py")


def test_two_processes_build_the_store_once(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(gzip.decompress(DEMO_CORPUS.read_bytes()) * 3)  # ~1.5M tokens
    stores = tmp_path / "stores"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(SCRIPT), str(corpus), str(stores), str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert ranks[0]["built_by"] == ranks[0]["pid"] != ranks[1]["pid"]
    assert proc.stderr.count("tad_torchtune: building the token store") == 1
    for key in ("len", "fingerprint", "store", "first"):
        assert ranks[0][key] == ranks[1][key], key
    assert [p.name for p in stores.iterdir() if not p.name.startswith(".")] == [Path(ranks[0]["store"]).name]
    assert list(stores.glob(".tmp-*")) == []
