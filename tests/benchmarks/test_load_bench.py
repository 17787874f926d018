"""benchmarks/load_bench.py: both ways of loading a teacher, each in a fresh process, give the
same weights and buffers (a hash of every byte), on a tiny Gemma2 (soft-caps, the family's
fix-up, RoPE caches) in bf16."""

import json
import sys
from pathlib import Path

from tests.helpers.teachers import teacher_node

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import load_bench  # noqa: E402


def test_both_ways_load_the_same_weights(tmp_path):
    out = tmp_path / "load.json"
    result = load_bench.main(["--model", json.dumps(teacher_node("gemma2")), "--dtype", "bf16",
                              "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert set(result["ways"]) == {"meta", "build_then_load"}
    assert result["same_weights"], result
    assert all(r["params"] == result["ways"]["meta"]["params"] > 0
               for r in result["ways"].values())


def test_two_processes_load_the_same_weights_either_way(tmp_path):
    """``--nproc 2``: every rank holding the checkpoint, or rank 0 alone broadcasting it, give
    the same gathered weights; each rank holds half of them."""
    result = load_bench.main(["--nproc", "2", "--model", json.dumps(teacher_node("qwen2")),
                              "--dtype", "fp32"])
    assert set(result["ways"]) == {"fsdp_every", "fsdp_rank0"}
    assert result["same_weights"], result
    for rows in result["ways"].values():
        assert [r["rank"] for r in rows] == [0, 1]
        assert rows[0]["local_params"] == rows[1]["local_params"] > 0
