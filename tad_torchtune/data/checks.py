"""The checks a recipe runs on its data against its models, at set-up where the data allows and
on each batch where only the batch can tell: each names the config key in one line
(``tad_torchtune.errors``), where the models would otherwise fail with a shape error deep in
RoPE, an index error in the embedding (a device-side assert on a GPU), or a dataset's error at
the first step, after the checkpoints were read."""

from collections.abc import Mapping
from typing import Any

from tad_torchtune.data.batch import Batch
from tad_torchtune.data.dataset import TextBlockDataset
from tad_torchtune.errors import ConfigError, instantiate, one_line, user_error_types


def build_dataset(node: Mapping[str, Any], key: str, tokenizer: Any) -> Any:
    """The dataset of config node ``key``, and, for a builder other than the project's, its
    first sample made once: a torchtune dataset reads its files when built and makes a sample
    when asked (a column missing from the file, a tokenizer that cannot format messages).

    Raises:
        ConfigError: naming ``key``, the component, the error's type and its message, for an
            error of another package's builder or of its first sample (``TAD_TORCHTUNE_TRACEBACK=1``
            shows the traceback).
    """
    component = str(node.get("_component_", ""))
    ours = component.startswith("tad_torchtune.")
    try:
        dataset = instantiate(node, key, tokenizer)
    except Exception as err:
        if ours or isinstance(err, user_error_types()):
            raise
        raise ConfigError(f"{key}: {component} cannot be built from this config: "
                          f"{type(err).__name__}: {one_line(err)}") from err
    if not ours and len(dataset) > 0:
        try:
            dataset[0]
        except Exception as err:
            # torchtune's SFT datasets call a model tokenizer on messages
            hint = ("" if hasattr(tokenizer, "tokenize_messages")
                    or not isinstance(err, (TypeError, AttributeError)) else
                    f"; accepted: a tokenizer that formats messages (a torchtune model "
                    f"tokenizer, e.g. torchtune.models.qwen2_5.qwen2_5_tokenizer), which "
                    f"{type(tokenizer).__name__} is not")
            raise ConfigError(f"{key}: {component} cannot make its first sample: "
                              f"{type(err).__name__}: {one_line(err)}{hint}") from err
    return dataset


def check_row_length(dataset: Any, key: str, tokenizer: Any, max_seq_len: int) -> None:
    """Check that the rows ``dataset`` makes fit the models' ``max_seq_len`` (their RoPE
    tables), where the length is known before a batch: a token store's block, torchtune's
    packed rows, a tokenizer's ``max_seq_len`` (an unbounded tokenizer is checked per batch).

    Raises:
        ConfigError: naming the key that sets the length.
    """
    if isinstance(dataset, TextBlockDataset):
        length, name = dataset.max_seq_len, f"{key}.max_seq_len"
    elif getattr(dataset, "max_seq_len", None) is not None:  # torchtune's PackedDataset
        length, name = dataset.max_seq_len, "tokenizer.max_seq_len"
    else:
        length, name = getattr(tokenizer, "max_seq_len", None), "tokenizer.max_seq_len"
    if isinstance(length, int) and length > max_seq_len:
        raise ConfigError(f"{name}: rows of {length} tokens, but the models take at most "
                          f"{max_seq_len} (their max_seq_len); accepted: at most {max_seq_len}")


def check_held_out(train: Any, validation: Any) -> None:
    """Check that the validation blocks are not training blocks: two splits of one token store,
    or of two stores of the same tokens (a copy of the corpus), whose token ranges meet (a
    different ``validation_fraction`` or ``split`` in the two blocks of the config) would
    measure ``val_kl`` on trained text.

    Raises:
        ConfigError: naming ``validation_dataset``, both ranges and the store.
    """
    if not (isinstance(train, TextBlockDataset) and isinstance(validation, TextBlockDataset)):
        return
    # one store, or two of the same tokens (a copy of the corpus: the same fingerprint)
    if (train.store_path != validation.store_path
            and train.fingerprint != validation.fingerprint):
        return
    (a, b), (c, d) = train.tokens, validation.tokens
    if a < d and c < b:
        same = ("" if train.store_path == validation.store_path else
                f" (of the store {str(train.store_path)!r}, whose tokens are the same)")
        raise ConfigError(
            f"validation_dataset: its blocks, tokens [{c}, {d}) of the store "
            f"{str(validation.store_path)!r}, overlap the training blocks [{a}, {b}){same}: "
            f"val_kl would be measured on trained text; give dataset and validation_dataset "
            f"the same source and validation_fraction, with validation_dataset.split: "
            f"validation")


#: what names the rows a torchtune dataset builder reads (Hugging Face ``load_dataset``'s)
ROW_KEYS = ("_component_", "source", "data_files", "data_dir", "name", "split")


def same_rows(train_node: Any, validation_node: Any) -> str | None:
    """A warning line when a dataset builder other than a token store's is given the same
    rows for validation as for training (the same source, files and split: ``val_kl`` then
    measured on trained text), else None. Token stores are checked by their blocks
    (``check_held_out``)."""
    def rows(node: Any) -> tuple:
        return tuple(str(node.get(k)) for k in ROW_KEYS)

    if train_node.get("_component_") == "tad_torchtune.data.text_block_dataset":
        return None
    if rows(train_node) != rows(validation_node):
        return None
    return (f"validation_dataset: the same source, data_files and split as dataset "
            f"({validation_node.get('data_files') or validation_node.get('source')!s}, split "
            f"{validation_node.get('split')!s}): val_kl is measured on the training rows")


def data_cut(dataset: Any) -> dict[str, Any]:
    """What a resume needs unchanged besides the store: the number of samples the sampler
    orders, and for a token store the blocks' length and token range (another
    ``max_seq_len`` or ``validation_fraction`` makes other blocks of the same store)."""
    cut: dict[str, Any] = {"samples": len(dataset)}
    if isinstance(dataset, TextBlockDataset):
        cut.update(max_seq_len=dataset.max_seq_len, tokens=list(dataset.tokens))
    return cut


def check_batch(batch: Batch, *, max_seq_len: int, vocab_size: int,
                vocab_of: str = "student_model") -> None:
    """Check a collated batch on the host: rows no longer than the models' ``max_seq_len`` (a
    dataset whose rows are not cut to a known length: an unbounded tokenizer) and ids below the
    student's vocabulary (a tokenizer's size says too little: a byte-level BPE has ids for bytes
    that text never holds, so only the ids the data holds are checked).

    Args:
        vocab_of: the model whose vocabulary ``vocab_size`` is, named by the error.

    Raises:
        ConfigError: naming what sets the length (``tokenizer.max_seq_len``) or ``tokenizer``.
    """
    length = batch.tokens.shape[1]
    if length > max_seq_len:
        raise ConfigError(f"tokenizer.max_seq_len: a batch has rows of {length} tokens, but the "
                          f"models take at most {max_seq_len} (their max_seq_len); accepted: a "
                          f"tokenizer.max_seq_len (or the dataset's max_seq_len) of at most "
                          f"{max_seq_len}")
    top = int(batch.tokens.max()) if batch.tokens.numel() else -1
    if top >= vocab_size:
        raise ConfigError(f"tokenizer: the data holds token id {top}, but {vocab_of}'s "
                          f"vocabulary has {vocab_size} ids; accepted: the models' tokenizer")
