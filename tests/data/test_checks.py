"""The checks of what the data gives the models (``tad_torchtune/data/checks.py``)."""

from omegaconf import OmegaConf

from tad_torchtune.data.checks import same_rows

INSTRUCT = {"_component_": "torchtune.datasets.instruct_dataset", "source": "json",
            "data_files": "/data/train.jsonl", "split": "train", "train_on_input": False}


def test_the_same_rows_for_validation_as_for_training_are_told():
    train = OmegaConf.create(INSTRUCT)
    assert same_rows(train, OmegaConf.create({**INSTRUCT, "packed": True})) == (
        "validation_dataset: the same source, data_files and split as dataset "
        "(/data/train.jsonl, split train): val_kl is measured on the training rows")
    for other in ({"data_files": "/data/validation.jsonl"}, {"split": "train[95%:]"},
                  {"_component_": "torchtune.datasets.chat_dataset"}):
        assert same_rows(train, OmegaConf.create({**INSTRUCT, **other})) is None
    # token stores: their blocks are checked (check_held_out), not their nodes
    blocks = OmegaConf.create({"_component_": "tad_torchtune.data.text_block_dataset",
                               "source": "/data/c.jsonl", "split": "train"})
    assert same_rows(blocks, blocks) is None


def test_validation_on_a_copy_of_the_training_corpus_is_refused(demo_tok, tmp_path):
    """A byte-identical copy of the training corpus under another name makes another store of
    the same tokens (the same fingerprint): its overlapping blocks are refused as those of the
    same store are (before, val_kl was measured on 75% trained text, silently); a corpus of
    other text is not."""
    import json
    import shutil

    import pytest

    from tad_torchtune.data import text_block_dataset
    from tad_torchtune.data.checks import check_held_out
    from tad_torchtune.errors import ConfigError

    corpus = tmp_path / "a.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}: " + "the daemon frobs. " * 20})
                              + "\n" for i in range(40)))
    shutil.copyfile(corpus, tmp_path / "copy.jsonl")
    other = tmp_path / "other.jsonl"
    other.write_text(corpus.read_text().replace("daemon", "wizard"))

    def blocks(path, **kw):
        return text_block_dataset(demo_tok, source=str(path), max_seq_len=32,
                                  **{"validation_fraction": 0.05, **kw})

    train = blocks(corpus)
    copy = blocks(tmp_path / "copy.jsonl", split="validation", validation_fraction=0.2)
    assert copy.store_path != train.store_path and copy.fingerprint == train.fingerprint
    with pytest.raises(ConfigError) as err:
        check_held_out(train, copy)
    assert str(err.value).startswith(
        f"validation_dataset: its blocks, tokens [{copy.tokens[0]}, {copy.tokens[1]}) of the "
        f"store {str(copy.store_path)!r}, overlap the training blocks [0, {train.tokens[1]}) "
        f"(of the store {str(train.store_path)!r}, whose tokens are the same): val_kl would")
    check_held_out(train, blocks(tmp_path / "copy.jsonl", split="validation"))  # disjoint
    check_held_out(train, blocks(other, split="validation", validation_fraction=0.2))


def test_an_sft_dataset_with_a_plain_text_tokenizer_names_what_it_needs(demo_tok, tmp_path):
    """torchtune's SFT datasets format messages with a model tokenizer; with a plain-text one
    (the demo's) the first sample fails with "object is not callable", which now says what is
    accepted."""
    import json

    import pytest

    from tad_torchtune.data.checks import build_dataset
    from tad_torchtune.errors import ConfigError

    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"input": "a question", "output": "an answer"}] * 4))
    node = {"_component_": "torchtune.datasets.instruct_dataset", "source": "json",
            "data_files": str(rows), "split": "train"}
    with pytest.raises(ConfigError) as err:
        build_dataset(OmegaConf.create(node), "dataset", demo_tok)
    assert str(err.value) == (
        "dataset: torchtune.datasets.instruct_dataset cannot make its first sample: TypeError: "
        "'HuggingFaceBaseTokenizer' object is not callable; accepted: a tokenizer that formats "
        "messages (a torchtune model tokenizer, e.g. torchtune.models.qwen2_5.qwen2_5_tokenizer), "
        "which HuggingFaceBaseTokenizer is not")
