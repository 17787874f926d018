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
