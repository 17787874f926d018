"""TextBlockDataset over a token store, against naive in-memory references."""

import json
import pickle

import pytest
import torch

from tad_torchtune.data import TextBlockDataset, text_block_dataset
from tests.data.reference import blocks, encode_all, legacy_blocks
from tests.helpers.toy_tokenizers import ByteTokenizer

DEMO = "pkg://demo/jargon.jsonl.gz"


@pytest.fixture(scope="module")
def demo_encoded(demo_tok, demo_docs):
    return encode_all(demo_tok, demo_docs)


@pytest.mark.parametrize("split, max_seq_len, validation_fraction", [
    ("train", 128, 0.05), ("validation", 128, 0.05), ("train", 47, 0.2), ("validation", 47, 0.2),
    ("train", 256, 0.0),
])
def test_blocks_and_document_ids_equal_the_naive_reference(demo_tok, demo_encoded, split,
                                                           max_seq_len, validation_fraction):
    ds = text_block_dataset(demo_tok, source=DEMO, max_seq_len=max_seq_len, split=split,
                            validation_fraction=validation_fraction)
    ref_tokens, ref_docs = blocks(demo_encoded, max_seq_len=max_seq_len, split=split,
                                  validation_fraction=validation_fraction)
    assert len(ds) == len(ref_tokens) > 0
    for i in range(len(ds)):
        sample = ds[i]
        assert sample["tokens"].dtype == sample["document_ids"].dtype == torch.int64
        assert sample["tokens"].tolist() == ref_tokens[i] == sample["labels"].tolist(), i
        assert sample["document_ids"].tolist() == ref_docs[i], i
    assert max(max(d) for d in ref_docs) > 0  # blocks do straddle documents


def test_the_demo_against_the_implementation_before_the_store(demo_tok, demo_encoded):
    """Training blocks are the old ones (one fewer: the stream now stops at the first held-out
    document); held-out blocks now start at a document boundary instead of a multiple of 128."""
    train = text_block_dataset(demo_tok, source=DEMO, max_seq_len=128, split="train")
    val = text_block_dataset(demo_tok, source=DEMO, max_seq_len=128, split="validation")
    old_train = legacy_blocks(demo_encoded, max_seq_len=128, split="train", validation_fraction=0.05)
    old_val = legacy_blocks(demo_encoded, max_seq_len=128, split="validation", validation_fraction=0.05)
    assert (len(old_train), len(old_val)) == (3828, 202)
    assert (len(train), len(val)) == (3827, 202)
    assert [train[i]["tokens"].tolist() for i in range(len(train))] == old_train[:3827]
    assert val[0]["tokens"].tolist() != old_val[0]
    # the held-out documents: the last 136 of the 179 that the demo teacher never saw
    assert (train.num_documents, val.num_documents) == (2361, 136)
    assert val[0]["tokens"][0].item() == demo_tok.bos_id
    assert train.fingerprint == val.fingerprint and train.store_path == val.store_path


def test_max_blocks_and_indexing(demo_tok):
    ds = text_block_dataset(demo_tok, source=DEMO, max_seq_len=64, max_blocks=5)
    full = text_block_dataset(demo_tok, source=DEMO, max_seq_len=64)
    assert len(ds) == 5
    assert torch.equal(ds[-1]["tokens"], full[4]["tokens"])
    assert [s["tokens"].tolist() for s in ds] == [full[i]["tokens"].tolist() for i in range(5)]
    with pytest.raises(IndexError):
        ds[5]
    assert ds.token_span(2) == (128, 192)


def test_a_sample_label_edit_leaves_its_tokens(demo_tok):
    ds = text_block_dataset(demo_tok, source=DEMO, max_seq_len=32)
    s = ds[0]
    s["labels"][0] = -100
    assert ds[0]["tokens"][0] == s["tokens"][0] != -100


def test_pickles_as_its_store_path(demo_tok):
    ds = text_block_dataset(demo_tok, source=DEMO, max_seq_len=128, split="validation")
    blob = pickle.dumps(ds)
    assert len(blob) < 10_000  # not the token file
    again = pickle.loads(blob)
    assert torch.equal(again[5]["tokens"], ds[5]["tokens"]) and again.fingerprint == ds.fingerprint


def _jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path)


def test_split_errors(tmp_path):
    tok = ByteTokenizer()
    single = tmp_path / "one.txt"
    single.write_text("x" * 1000)
    with pytest.raises(ValueError) as info:
        TextBlockDataset(tok, source=str(single), max_seq_len=32, validation_fraction=0.1)
    assert str(info.value) == (
        f"dataset.validation_fraction: 0.1 holds out every document of '{single}' (1 document(s), "
        "1002 tokens): the held-out split is the fewest whole documents at the end holding that "
        "share of the tokens; accepted: a corpus of several documents, or a smaller "
        "validation_fraction")
    assert len(TextBlockDataset(tok, source=str(single), max_seq_len=32, validation_fraction=0)) == 31
    two = _jsonl(tmp_path / "two.jsonl", ["a" * 100, "b" * 10])
    with pytest.raises(ValueError) as info:
        TextBlockDataset(tok, source=two, max_seq_len=32, split="validation")
    assert str(info.value) == (
        f"dataset: the validation split of '{two}' is empty (1 documents, 12 tokens, less than one "
        "block of 32 tokens; validation_fraction=0.05); accepted: a split of at least max_seq_len "
        "tokens (a smaller max_seq_len, another validation_fraction, more text)")
    assert len(TextBlockDataset(tok, source=two, max_seq_len=32)) == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"split": "test"}, "dataset.split must be one of ('train', 'validation'), got 'test'"),
    ({"validation_fraction": 1.0}, "dataset.validation_fraction must be in [0, 1), got 1.0"),
    ({"max_seq_len": 1}, "dataset.max_seq_len must be an integer >= 2, got 1"),
    ({"max_blocks": 0}, "dataset.max_blocks must be an integer >= 1 or null, got 0"),
    ({"column": ""}, "dataset.column must be a non-empty string, got ''"),
])
def test_argument_errors(tmp_path, kwargs, message):
    src = _jsonl(tmp_path / "c.jsonl", ["abc"] * 50)
    with pytest.raises(ValueError) as info:
        TextBlockDataset(ByteTokenizer(), **{"source": src, "max_seq_len": 8, **kwargs})
    assert str(info.value) == message
