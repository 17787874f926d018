"""Naive references for the data tests: every document tokenized into a Python list, in memory."""

import gzip
import json
import math
from pathlib import Path
from typing import Any

DEMO_CORPUS = Path(__file__).parents[2] / "tad_torchtune" / "assets" / "demo" / "jargon.jsonl.gz"


def read_documents(path: Path, column: str = "text") -> list[str]:
    """All documents of a file at once (the pre-store reader)."""
    name = path.name.lower()
    opener = gzip.open if name.endswith(".gz") else open
    stem = name[:-3] if name.endswith(".gz") else name
    if stem.endswith((".jsonl", ".json")):
        with opener(path, "rt", encoding="utf-8") as f:
            return [json.loads(line)[column] for line in f if line.strip()]
    if stem.endswith(".parquet"):
        import pyarrow.parquet as pq

        return [str(x) for x in pq.read_table(path, columns=[column]).column(column).to_pylist()]
    with opener(path, "rt", encoding="utf-8") as f:
        return [f.read()]


def encode_all(tokenizer: Any, docs: list[str]) -> list[list[int]]:
    return [list(tokenizer.encode(d, add_bos=True, add_eos=True)) for d in docs]


def blocks(encoded: list[list[int]], *, max_seq_len: int, split: str, validation_fraction: float,
           max_blocks: int | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """Blocks of a split and their per-token document ids, the document-aligned way.

    Validation: walk back from the last document until the documents taken hold at least
    ceil(validation_fraction * total) tokens. Document ids: 0 at a block's first token, +1 each
    time the (global) document of the token changes.
    """
    total = sum(len(e) for e in encoded)
    need = math.ceil(validation_fraction * total)
    k, held = 0, 0
    while held < need:
        k += 1
        held += len(encoded[-k])
    chosen = encoded[: len(encoded) - k] if split == "train" else encoded[len(encoded) - k:]
    stream, owner = [], []
    for d, ids in enumerate(chosen):
        stream.extend(ids)
        owner.extend([d] * len(ids))
    n = len(stream) // max_seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    out_tokens, out_docs = [], []
    for b in range(n):
        s = b * max_seq_len
        out_tokens.append(stream[s: s + max_seq_len])
        ids = [0]
        for t in range(s + 1, s + max_seq_len):
            ids.append(ids[-1] + (owner[t] != owner[t - 1]))
        out_docs.append(ids)
    return out_tokens, out_docs


def legacy_blocks(encoded: list[list[int]], *, max_seq_len: int, split: str,
                  validation_fraction: float) -> list[list[int]]:
    """What TextBlockDataset yielded before the token store: one stream cut into blocks, the
    last ceil(validation_fraction * n_blocks) blocks held out."""
    stream = [t for ids in encoded for t in ids]
    n_blocks = len(stream) // max_seq_len
    n_val = math.ceil(validation_fraction * n_blocks) if validation_fraction > 0 else 0
    first, last = (0, n_blocks - n_val) if split == "train" else (n_blocks - n_val, n_blocks)
    return [stream[b * max_seq_len: (b + 1) * max_seq_len] for b in range(first, last)]
