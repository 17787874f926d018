"""The documents a user reads point at things that exist: every relative link, image and
backticked repository path in the README, docs/ and benchmarks/RESULTS.md resolves inside the
repository, and the README stays a short guide."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = ["README.md", "docs/design.md", "benchmarks/RESULTS.md"]
LINK = re.compile(r"\]\(([^)#\s]+)\)")
# backticked paths of the repository's own top-level folders (`docs/demo/summary.json`, ...)
PATH = re.compile(r"`((?:tad_torchtune|recipes|configs|docs|tests|benchmarks|scripts)/[\w./-]+)`")


@pytest.mark.parametrize("doc", DOCS)
def test_every_reference_resolves(doc):
    text = (ROOT / doc).read_text()
    refs = [m for m in LINK.findall(text) if not m.startswith(("http://", "https://"))]
    refs += PATH.findall(text)
    assert refs, f"{doc}: no reference found (the patterns are wrong)"
    missing = [r for r in refs if not (ROOT / doc).parent.joinpath(r).exists()
               and not (ROOT / r).exists() and not any(ROOT.glob(r.rstrip("/") + "*"))]
    assert not missing, f"{doc}: {missing} do not exist"


def test_the_readme_is_a_short_guide():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 220, len(lines)
    setup = "\n".join(lines[:20])
    assert "python -m tad_torchtune.demo" in setup and "python -m pytest -q" in setup
