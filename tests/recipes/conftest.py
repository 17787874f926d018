import pytest

from tests.recipes import tiny


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny tokenizer, teacher checkpoint and corpus (``tiny.make_assets``), one per test module."""
    return tiny.make_assets(tmp_path_factory.mktemp("assets"))
