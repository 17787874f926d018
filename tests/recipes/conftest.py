import pytest

from tests.helpers import tune


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """A tiny tokenizer, teacher checkpoint and corpus (``tune.make_assets``), made once: the
    recipe tests only read them (a test that damages a file copies it first)."""
    return tune.make_assets(tmp_path_factory.mktemp("assets"))
