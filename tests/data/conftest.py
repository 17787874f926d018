import pytest

from tests.data.reference import DEMO_CORPUS, read_documents


@pytest.fixture(scope="session")
def demo_tok():
    from tad_torchtune.demo import demo_tokenizer

    return demo_tokenizer()


@pytest.fixture(scope="session")
def demo_docs():
    return read_documents(DEMO_CORPUS)
