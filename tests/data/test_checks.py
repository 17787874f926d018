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
