"""A corpus as fixed-length blocks of one token stream, read from a memory-mapped token store."""

import math
import operator
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from tad_torchtune.checks import check_choice, check_int, is_number
from tad_torchtune.data.prepare import prepare_store
from tad_torchtune.data.store import TokenStore

SPLITS = ("train", "validation")


def validation_start(offsets: np.ndarray, validation_fraction: float) -> int:
    """The first document of the held-out split: the smallest run of whole documents at the end
    holding at least ``validation_fraction`` of the tokens (the number of documents when 0).

    Args:
        offsets: [num_documents + 1] document offsets (``TokenStore.offsets``).
        validation_fraction: in [0, 1).
    """
    total = int(offsets[-1])
    need = math.ceil(validation_fraction * total)
    # the largest d with offsets[d] <= total - need: documents d.. hold >= need tokens
    return int(np.searchsorted(offsets, total - need, side="right")) - 1


class TextBlockDataset(Dataset):
    """A text corpus, tokenized as one stream (documents joined with EOS) and cut into blocks.

    The corpus is tokenized once into a token store (``tad_torchtune.data.store``; each document
    ``tokenizer.encode(doc, add_bos=True, add_eos=True)``) and memory-mapped at every later start,
    so start-up time and memory do not grow with the corpus. The store is found by a key computed
    from the files' paths, sizes and modification times and the tokenizer's fingerprint (files
    touched or copied since are hashed and the store of their contents linked, not rebuilt); a
    missing one is built on the spot (``tad_torchtune.data.prepare.prepare_store``: under torchrun by local
    rank 0, the others waiting) or beforehand by ``tune run tad_prepare --config CONFIG``.

    Splits are whole documents: the validation split is the smallest run of documents at the
    END of the corpus holding at least ``validation_fraction`` of its tokens, training is every
    document before it. Each split's documents are joined as one stream, and block ``i`` of a
    split is its tokens ``[i*L, (i+1)*L)`` with ``L = max_seq_len``; the trailing partial block is
    dropped. Samples are ``{"tokens": [L], "labels": [L], "document_ids": [L]}`` int64 tensors:
    labels equal tokens (the recipe shifts them), and ``document_ids[t]`` is the index, within the
    block, of the document token ``t`` belongs to (0 for the block's first document, +1 at each
    document start inside the block). ``tad_torchtune.data.collate`` stacks them into a batch.

    Args:
        tokenizer: any torchtune tokenizer with ``encode(text, add_bos, add_eos)``.
        source: a file, a folder, a glob, or a list of them: ``.txt`` (one document per file),
            ``.jsonl``/``.json`` (one document per line, field ``column``), ``.parquet``; ``.gz``
            allowed for text and JSON. ``pkg://PATH`` refers to files shipped in the package.
        max_seq_len: block length in tokens.
        split: ``"train"`` or ``"validation"``.
        validation_fraction: least share of the tokens held out, in [0, 1).
        column: text field of JSON lines and parquet files.
        max_blocks: keep only the first N blocks of the split (quick runs and tests).
        store_dir: folder of the token stores (default ``$TAD_TORCHTUNE_STORE_DIR``, else
            ``~/.cache/tad_torchtune/stores``).
        token_dtype: ``"auto"`` (uint16 when the vocabulary fits, else uint32), ``"uint16"`` or
            ``"uint32"``.

    Raises:
        ValueError: a bad argument, a corpus that cannot be read, or an empty split, naming the
            config key (``dataset.KEY``), the value and what is accepted.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        source: str | Sequence[str],
        max_seq_len: int,
        split: str = "train",
        validation_fraction: float = 0.05,
        column: str = "text",
        max_blocks: int | None = None,
        store_dir: str | os.PathLike | None = None,
        token_dtype: str = "auto",
    ) -> None:
        check_choice(split, "dataset.split", SPLITS)
        if not is_number(validation_fraction) or not 0 <= validation_fraction < 1:
            raise ValueError(
                f"dataset.validation_fraction must be in [0, 1), got {validation_fraction!r}"
            )
        check_int(max_seq_len, "dataset.max_seq_len", minimum=2)
        check_int(max_blocks, "dataset.max_blocks", optional=True)
        if not isinstance(column, str) or not column:
            raise ValueError(f"dataset.column must be a non-empty string, got {column!r}")
        self._store, _ = prepare_store(source, tokenizer, column=column, store_dir=store_dir,
                                       token_dtype=token_dtype)
        offsets = self._store.offsets
        n_docs = self._store.num_documents
        first_val = validation_start(offsets, validation_fraction)
        if first_val == 0:
            raise ValueError(
                f"dataset.validation_fraction: {validation_fraction!r} holds out every document of "
                f"{source!r} ({n_docs} document(s), {self._store.num_tokens} tokens): the held-out "
                "split is the fewest whole documents at the end holding that share of the tokens; "
                "accepted: a corpus of several documents, or a smaller validation_fraction"
            )
        docs = (0, first_val) if split == "train" else (first_val, n_docs)
        self._begin, end = int(offsets[docs[0]]), int(offsets[docs[1]])
        n_blocks = (end - self._begin) // max_seq_len
        if max_blocks is not None:
            n_blocks = min(n_blocks, max_blocks)
        if n_blocks == 0:
            raise ValueError(
                f"dataset: the {split} split of {source!r} is empty ({docs[1] - docs[0]} documents, "
                f"{end - self._begin} tokens, less than one block of {max_seq_len} tokens; "
                f"validation_fraction={validation_fraction}); accepted: a split of at least "
                f"max_seq_len tokens (a smaller max_seq_len, another validation_fraction, more "
                f"text)"
            )
        self._len = n_blocks
        self._seq_len = max_seq_len
        self._split_documents = docs

    @property
    def store_path(self) -> Path:
        """The folder of the token store this dataset reads."""
        return self._store.path

    @property
    def fingerprint(self) -> str:
        """The store's content fingerprint: equal for two builds of the same data by the same
        tokenizer; save it with checkpoints and refuse to resume on another."""
        return self._store.fingerprint

    @property
    def store(self) -> TokenStore:
        return self._store

    @property
    def max_seq_len(self) -> int:
        """Tokens per block."""
        return self._seq_len

    @property
    def tokens(self) -> tuple[int, int]:
        """``(start, stop)`` of this split's blocks in the store's token stream."""
        return self._begin, self._begin + self._len * self._seq_len

    @property
    def num_documents(self) -> int:
        """Documents of this split (whole documents; blocks may cut the last one)."""
        return self._split_documents[1] - self._split_documents[0]

    def token_span(self, index: int) -> tuple[int, int]:
        """``(start, stop)`` of block ``index`` in the store's token stream."""
        index = operator.index(index)
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(f"block {index} out of range for a dataset of {self._len} blocks")
        start = self._begin + index * self._seq_len
        return start, start + self._seq_len

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        start, stop = self.token_span(index)
        tokens = torch.from_numpy(self._store.tokens[start:stop].astype(np.int64))
        return {"tokens": tokens, "labels": tokens.clone(),
                "document_ids": torch.from_numpy(self._document_ids(start, stop))}

    def _document_ids(self, start: int, stop: int) -> np.ndarray:
        offsets = self._store.offsets
        # documents starting strictly inside the block, as positions in it
        first = np.searchsorted(offsets, start, side="right")
        last = np.searchsorted(offsets, stop, side="left")
        ids = np.zeros(stop - start, np.int64)
        ids[offsets[first:last] - start] = 1  # an empty document starts where the next does
        return np.cumsum(ids, out=ids)


#: Builder for YAML: ``_component_: tad_torchtune.data.text_block_dataset``; the class itself, so
#: that a missing or unknown argument is named against its signature (``errors.instantiate``)
text_block_dataset = TextBlockDataset
