import pytest

from tests.helpers import tune


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny tokenizer, teacher checkpoint and corpus (``tune.make_assets``), one per test module."""
    return tune.make_assets(tmp_path_factory.mktemp("assets"))
