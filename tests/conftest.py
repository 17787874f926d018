import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def token_store_dir(tmp_path_factory):
    """Token stores built by the tests (in this process and in the `tune run`s it starts) go to a
    temporary folder, never to the user's ~/.cache."""
    before = os.environ.get("TAD_TORCHTUNE_STORE_DIR")
    os.environ["TAD_TORCHTUNE_STORE_DIR"] = str(tmp_path_factory.mktemp("token_stores"))
    yield os.environ["TAD_TORCHTUNE_STORE_DIR"]
    if before is None:
        del os.environ["TAD_TORCHTUNE_STORE_DIR"]
    else:
        os.environ["TAD_TORCHTUNE_STORE_DIR"] = before
