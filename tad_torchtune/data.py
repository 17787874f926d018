"""Datasets and batching for distillation: a plain-text corpus cut into blocks, and a sampler whose
position is a number, so a run resumes exactly on any number of processes."""

import gzip
import json
import math
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import Dataset, Sampler

SPLITS = ("train", "validation")


def _read_documents(path: Path, column: str) -> list[str]:
    name = path.name.lower()
    opener = gzip.open if name.endswith(".gz") else open
    stem = name[:-3] if name.endswith(".gz") else name
    if stem.endswith(".jsonl") or stem.endswith(".json"):
        with opener(path, "rt", encoding="utf-8") as f:
            return [json.loads(line)[column] for line in f if line.strip()]
    if stem.endswith(".parquet"):
        import pyarrow.parquet as pq  # installed with torchtune's `datasets` dependency

        return [str(x) for x in pq.read_table(path, columns=[column]).column(column).to_pylist()]
    if stem.endswith(".txt") or stem.endswith(".text"):
        with opener(path, "rt", encoding="utf-8") as f:
            return [f.read()]
    raise ValueError(
        f"dataset.source: unsupported file {str(path)!r}; accepted: .txt, .jsonl, .json, .parquet "
        "(optionally .gz, except parquet)"
    )


def _expand_sources(source: str | list[str]) -> list[Path]:
    paths: list[Path] = []
    for item in [source] if isinstance(source, str) else list(source):
        p = Path(str(item)).expanduser()
        if p.is_dir():
            paths.extend(sorted(q for q in p.iterdir() if q.is_file()))
        elif p.exists():
            paths.append(p)
        else:
            matches = sorted(p.parent.glob(p.name))
            if not matches:
                raise ValueError(f"dataset.source: no file matches {str(item)!r}")
            paths.extend(matches)
    return paths


def resolve_asset(path: str) -> str:
    """``pkg://NAME`` -> the file NAME inside ``tad_torchtune/assets``; other paths unchanged."""
    if path.startswith("pkg://"):
        return str(Path(__file__).parent / "assets" / path[len("pkg://"):])
    return path


class TextBlockDataset(Dataset):
    """A text corpus, tokenized as one stream (documents joined with EOS) and cut into blocks.

    Block ``i`` is ``tokens[i*L : (i+1)*L]`` with ``L = max_seq_len``; the trailing partial block is
    dropped. The held-out split is the LAST ``ceil(validation_fraction * n_blocks)`` blocks, so it is
    contiguous text never seen in training. Samples are ``{"tokens": [...], "labels": [...]}`` with
    labels equal to tokens (the recipe shifts them), as torchtune's text-completion datasets give.

    Args:
        tokenizer: any torchtune tokenizer with ``encode(text, add_bos, add_eos)``.
        source: a file, a folder, a glob, or a list of them: ``.txt`` (one document per file),
            ``.jsonl``/``.json`` (one document per line, field ``column``), ``.parquet``; ``.gz``
            allowed for text and JSON. ``pkg://PATH`` refers to files shipped in the package.
        max_seq_len: block length in tokens.
        split: ``"train"`` or ``"validation"``.
        validation_fraction: share of blocks held out, in [0, 1).
        column: text field of JSON lines and parquet files.
        max_blocks: keep only the first N blocks of the split (quick runs and tests).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        source: str | list[str],
        max_seq_len: int,
        split: str = "train",
        validation_fraction: float = 0.05,
        column: str = "text",
        max_blocks: int | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"dataset.split must be one of {SPLITS}, got {split!r}")
        if not 0 <= validation_fraction < 1:
            raise ValueError(
                f"dataset.validation_fraction must be in [0, 1), got {validation_fraction!r}"
            )
        if not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise ValueError(f"dataset.max_seq_len must be an integer >= 2, got {max_seq_len!r}")
        if isinstance(source, str):
            source = resolve_asset(source)
        else:
            source = [resolve_asset(str(s)) for s in source]
        stream: list[int] = []
        for path in _expand_sources(source):
            for doc in _read_documents(path, column):
                stream.extend(tokenizer.encode(doc, add_bos=True, add_eos=True))
        n_blocks = len(stream) // max_seq_len
        n_val = math.ceil(validation_fraction * n_blocks) if validation_fraction > 0 else 0
        first, last = (0, n_blocks - n_val) if split == "train" else (n_blocks - n_val, n_blocks)
        if max_blocks is not None:
            last = min(last, first + max_blocks)
        if last <= first:
            raise ValueError(
                f"dataset: the {split} split of {source!r} is empty ({n_blocks} blocks of "
                f"{max_seq_len} tokens in all, validation_fraction={validation_fraction})"
            )
        self._tokens = torch.tensor(stream[first * max_seq_len : last * max_seq_len])
        self._tokens = self._tokens.view(last - first, max_seq_len)

    def __len__(self) -> int:
        return self._tokens.shape[0]

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        block = self._tokens[index].tolist()
        return {"tokens": block, "labels": list(block)}


def text_block_dataset(tokenizer: Any, **kwargs: Any) -> TextBlockDataset:
    """Builder for YAML: ``_component_: tad_torchtune.data.text_block_dataset``."""
    return TextBlockDataset(tokenizer, **kwargs)


class ResumableBatchSampler(Sampler[list[int]]):
    """Global batches in a per-epoch order fixed by ``(seed, epoch)``, this rank's share of each.

    Global batch ``b`` of an epoch is ``order[b*G : (b+1)*G]`` with ``G = batch_size * world_size``;
    rank ``r`` takes ``order[b*G + r*batch_size : b*G + (r+1)*batch_size]``. The trailing partial
    global batch is dropped. The position is the number of samples consumed in the epoch (counted
    globally), so a checkpoint taken on N processes resumes on M processes as long as the global
    batch stays the same multiple.

    Args:
        num_samples: dataset length.
        batch_size: per-rank micro-batch size.
        rank: this process's rank.
        world_size: number of data-parallel processes.
        shuffle: permute samples each epoch.
        seed: base seed of the permutation.
    """

    def __init__(
        self, num_samples: int, *, batch_size: int, rank: int = 0, world_size: int = 1,
        shuffle: bool = True, seed: int = 0,
    ) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.start_sample = 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def set_position(self, epoch: int, samples_consumed: int) -> None:
        if samples_consumed % self.global_batch:
            raise ValueError(
                f"cannot resume at sample {samples_consumed} of epoch {epoch}: it is not a multiple "
                f"of the global batch {self.global_batch} (batch_size {self.batch_size} x "
                f"{self.world_size} processes); keep batch_size * processes a divisor of it"
            )
        self.epoch, self.start_sample = epoch, samples_consumed

    def __len__(self) -> int:
        return (self.num_samples // self.global_batch) - self.start_sample // self.global_batch

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=gen).tolist()
        else:
            order = list(range(self.num_samples))
        n_global = self.num_samples // self.global_batch
        for b in range(self.start_sample // self.global_batch, n_global):
            begin = b * self.global_batch + self.rank * self.batch_size
            yield order[begin : begin + self.batch_size]
