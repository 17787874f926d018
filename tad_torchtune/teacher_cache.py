"""A teacher cache on disk: the teacher's statistics of every block of a prepared dataset.

``tune run tad_cache --config CONFIG`` writes one (``recipes/tad_cache.py``); ``tad_distill`` with
``teacher_cache_dir`` trains from it without running the teacher (``docs/design.md``, "The
teacher cache"). The format is plain NumPy, so another producer (a vLLM ``prompt_logprobs``
job, say) can write it too::

    TEACHER_CACHE_DIR/
      manifest.json                    the description below
      <split>/shard_<NNNNNN>/          blocks [i * shard_blocks, (i + 1) * shard_blocks) of a split
        ids.npy        [blocks, L, M]  the teacher's top-M ids per position, most probable first
                                       (uint16 when the vocabulary has at most 65536 ids, else int32)
        logp.npy       [blocks, L, M]  their log-probabilities under the full softmax (float16 by
                                       default; "logp_dtype")
        log_rest.npy   [blocks, L]     float32 log of the mass outside the top-M
                                       (LSE(logits outside) - LSE(logits), never log(1 - sum))
        label_logp.npy [blocks, L]     float32 log-probability of the next token (0 at a block's
                                       last position, which has none)

That is the bucket cache (``mode`` "top_m", 4 M + 8 bytes per position with uint16 ids and float16
log-probabilities). The sampled cache (``mode`` "sampled", ``docs/design.md``, "Divergences from
a sampled-tail cache") keeps the top K = ``top_m`` ids exactly and draws from the rest
(4 K + 8 + 2 S bytes per position with uint16 ids)::

        ids.npy        [blocks, L, K]  the teacher's top-K ids per position, most probable first
        logp.npy       [blocks, L, K]  their log-probabilities under the full softmax
        log_tail.npy   [blocks, L]     float32 log of the mass outside the top-K
        entropy.npy    [blocks, L]     float32 entropy of the renormalised rest (0 without one)
        draws.npy      [blocks, L, S]  S ids drawn from the renormalised rest, sorted (ids dtype):
                                       systematic draws of the uniform counter_uniform(seed,
                                       block, position), so every producer writes the same bytes

Position t of a block holds the teacher's distribution of token t+1 given tokens 0..t of the
block, at the cache's ``temperature``, over the student's vocabulary (the teacher's logits
aligned first, as ``vocab_alignment`` says). A shard folder is published by an atomic rename
once its files are written, so a shard that exists is complete; the cache is complete when
every shard of every split exists.

``manifest.json``: ``format`` ("tad_torchtune.teacher_cache"), ``version`` (1), ``mode`` (absent:
"top_m"; "sampled" with ``samples`` and ``seed``), ``document_mask`` (absent: false; true when
the teacher attended within documents), ``top_m``, ``vocab_size``, ``temperature``,
``ids_dtype``, ``logp_dtype``, ``shard_blocks``, ``teacher`` (what identifies it: model config,
checkpoint files with their sizes and sampled digests, dtype; ``teacher_identity``), and per split
``{store_fingerprint, first_token, max_seq_len, num_blocks}``: the blocks it covers are tokens
``first_token + [i * max_seq_len, (i + 1) * max_seq_len)`` of that store.
"""

import json
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tad_torchtune.errors import ConfigError
from tad_torchtune.files import atomic_write_text, publish_dir, remove_stale, staging_dir
from tad_torchtune.losses import CacheSpec
from tad_torchtune.losses.cached import CacheEntries, TeacherSampled, TeacherTopM

FORMAT = "tad_torchtune.teacher_cache"
VERSION = 1
LOGP_DTYPES = ("float16", "bfloat16", "float32")
#: each cache mode's entries and how its fields are stored ("ids": the ids dtype, "logp": the
#: log-probabilities' dtype, else that NumPy dtype)
MODES: dict[str, tuple[type[CacheEntries], dict[str, str]]] = {
    "top_m": (TeacherTopM, {"ids": "ids", "logp": "logp", "log_rest": "float32",
                            "label_logp": "float32"}),
    "sampled": (TeacherSampled, {"ids": "ids", "logp": "logp", "log_tail": "float32",
                                 "entropy": "float32", "draws": "ids"}),
}
#: ``cache_top_m`` when the config leaves it null, per mode
DEFAULT_TOP_M = {"top_m": 48, "sampled": 12}
#: the config keys of ``tad_cache`` that shape a cache as it is made
CACHE_KEYS = ("cache_mode", "cache_top_m", "cache_samples", "cache_seed", "cache_logp_dtype")


def cache_mode_for(divergence: type | None) -> str:
    """The cache a config gets when it leaves ``cache_mode`` null: the sampled one (unbiased,
    ``benchmarks/RESULTS.md``) for a divergence of the ``D_KL1 + w D_KL2`` form that it serves
    (TAD, forward KL), the bucket for any other (reverse KL, DRKL) or none."""
    from tad_torchtune.losses import Divergence

    if isinstance(divergence, type) and issubclass(divergence, Divergence) and \
            divergence.tail_weight is not Divergence.tail_weight:
        return "sampled"
    return "top_m"


@dataclass(frozen=True)
class BlockLayout:
    """Which blocks of which prepared store a split's cache covers."""

    store_fingerprint: str
    first_token: int
    max_seq_len: int
    num_blocks: int

    @classmethod
    def of(cls, dataset: Any) -> "BlockLayout":
        """The layout of a ``tad_torchtune.data.TextBlockDataset``."""
        start, stop = dataset.token_span(0)
        return cls(dataset.fingerprint, int(start), int(stop - start), len(dataset))


#: shards a reader keeps memory-mapped (5 file descriptors each, 4 for the bucket cache): far
#: below the common limit of 1024 open files whatever the cache's size
OPEN_SHARDS = 32

#: what changes each field of a ``BlockLayout``, as a refusal names it
_LAYOUT_CAUSES = {
    "store_fingerprint": "other data or another tokenizer",
    "first_token": "another dataset.validation_fraction or split",
    "max_seq_len": "another dataset.max_seq_len",
    "num_blocks": "another dataset.max_blocks, validation_fraction or split",
}


def check_blocks(dataset: Any, key: str) -> None:
    """Refuse a dataset other than a prepared store's blocks for a teacher cache (``key``: its
    config key), which is aligned to them."""
    from tad_torchtune.data import TextBlockDataset

    if not isinstance(dataset, TextBlockDataset):
        raise ConfigError(f"{key}._component_: the teacher cache is aligned to the blocks of a "
                          f"prepared store (tad_torchtune.data.text_block_dataset); instruct and "
                          f"chat datasets train with the live teacher")


#: a teacher checkpoint file's content digest reads this many blocks of this many bytes, spread
#: evenly from its start to its end (``sampled_digest``)
DIGEST_BLOCKS, DIGEST_BLOCK_BYTES = 16, 1 << 16


def sampled_digest(path: Path) -> str:
    """SHA-256 of the size of the file ``path`` and of ``DIGEST_BLOCKS`` blocks spread evenly
    over it, its first and last included: weights of the same shapes written over a checkpoint
    (a fine-tune saved in place, another seed) differ here, whatever the file's size (1 MiB is
    read) and whatever its path or modification time (a copied or moved teacher is the same)."""
    import hashlib

    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    block = min(DIGEST_BLOCK_BYTES, size)
    last = size - block
    with open(path, "rb") as f:
        for i in range(DIGEST_BLOCKS):
            f.seek(last * i // (DIGEST_BLOCKS - 1))
            digest.update(f.read(block))
    return digest.hexdigest()


def teacher_identity(cfg: Any) -> dict[str, Any]:
    """What identifies the teacher a cache was made with, from a ``tad_distill`` config: its
    model config, its checkpoint files (name -> size and ``sampled_digest``), the dtype and the
    vocabulary alignment; ``checkpoint_dir`` is recorded, not compared (``teacher_differences``)."""
    from omegaconf import OmegaConf

    from tad_torchtune.models import checkpoint_file_names
    from tad_torchtune.schema import DISTILL

    ckpt = cfg.teacher_checkpointer
    folder = Path(str(ckpt.checkpoint_dir)).expanduser()
    merges = DISTILL.get(cfg, "teacher_id_merges")
    files = {}
    for name in checkpoint_file_names(ckpt.get("checkpoint_files")):
        if (folder / name).is_file():
            files[name] = {"size": (folder / name).stat().st_size,
                           "sampled_sha256": sampled_digest(folder / name)}
    return {
        "model": OmegaConf.to_container(cfg.teacher_model, resolve=True),
        "checkpoint_dir": str(folder.resolve()),
        "checkpoint_files": files,
        "dtype": DISTILL.get(cfg, "dtype"),
        "vocab_alignment": DISTILL.get(cfg, "vocab_alignment"),
        # pairs: JSON would write a mapping's integer keys as strings
        "teacher_id_merges": sorted([int(k), int(v)] for k, v in merges.items()) if merges
        else None,
    }


#: what ``teacher_differences`` compares: the teacher's weights (its model config was checked
#: against their config.json; another spelling of it, a longer ``max_seq_len``, is the same
#: teacher), and, for a resumed ``tad_cache``, how it ran
TEACHER_WEIGHTS = ("checkpoint_files",)
TEACHER_RUN = ("model", "dtype", "vocab_alignment", "teacher_id_merges")
_TEACHER_KEYS = {"model": "teacher_model", "checkpoint_files": "teacher_checkpointer.checkpoint_files",
                 "dtype": "dtype", "vocab_alignment": "vocab_alignment",
                 "teacher_id_merges": "teacher_id_merges"}


def teacher_differences(then: dict[str, Any], now: dict[str, Any],
                        compared: tuple[str, ...] = TEACHER_WEIGHTS + TEACHER_RUN) -> list[str]:
    """How the teacher ``now`` (``teacher_identity``) differs from ``then``, a cache's, in the
    fields ``compared``: one phrase per difference, naming the config key. A file's size and
    digest are compared where both record them (a cache of an earlier version recorded the
    size alone)."""
    out = []
    for field in compared:
        key, old, new = _TEACHER_KEYS[field], then.get(field), now.get(field)
        if field != "checkpoint_files":
            if old != new and not (field == "model" and _same_model(old, new)):
                out.append(f"{key}: {new!r}, the cache's teacher {old!r}")
            continue
        old, new = old or {}, new or {}
        if not old:  # an earlier version recorded none of torchtune's filename_format form
            continue
        if set(old) != set(new):
            out.append(f"{key}: {sorted(new)}, the cache's teacher {sorted(old)}")
            continue
        for name in new:
            a = old[name] if isinstance(old[name], dict) else {"size": old[name]}
            b = new[name]
            if any(k in a and a[k] != b[k] for k in b):
                out.append(f"{key}: {name!r} holds other weights than the cache's teacher's "
                           f"(size {b['size']}, the cache's {a['size']}"
                           f"{'' if a['size'] != b['size'] else '; another content digest'})")
    return out


def _same_model(a: Any, b: Any) -> bool:
    """Whether two teacher model nodes are two spellings of one model: the same family and
    builder arguments (``resolve_teacher``: a model builder and the component builder it calls,
    ``hf_decoder`` of a folder and the builder its config.json describes), ``max_seq_len``
    aside (another length of RoPE's tables, the same weights and function)."""
    from tad_torchtune.models import resolve_teacher

    try:
        (fa, ka), (fb, kb) = resolve_teacher(a), resolve_teacher(b)
    except (ValueError, TypeError, AttributeError):  # a node that no longer resolves
        return False
    same = {k for k in ka.keys() | kb.keys() if k != "max_seq_len"}
    return fa.hf_model_type == fb.hf_model_type and all(ka.get(k) == kb.get(k) for k in same)


def ids_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "int32"


def _shard_dir(root: Path, split: str, index: int) -> Path:
    return root / split / f"shard_{index:06d}"


def _to_numpy(x: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # NumPy has no bfloat16: its bits, as uint16
        return x.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    return x.cpu().numpy().astype(dtype)


def _from_numpy(a: np.ndarray, dtype: str) -> torch.Tensor:
    """A shard's field as a float32 (int64 for ids) tensor of its own, in ONE copy out of the
    read-only memory map: the conversion's (bfloat16, stored as its 16 bits, widened by a shift
    of its bits into float32's, exactly as ``Tensor.float`` does)."""
    if dtype == "bfloat16":
        bits = a.view(np.uint16).astype(np.uint32)
        bits <<= 16
        return torch.from_numpy(bits.view(np.float32))
    return torch.from_numpy(a.astype(np.float32 if np.issubdtype(a.dtype, np.floating)
                                     else np.int64))


class TeacherCache:
    """A teacher cache folder, read (memory-mapped) or written shard by shard.

    Args:
        root: the folder (``teacher_cache_dir``).
        manifest: the manifest to write when the folder has none yet (``TeacherCache.create``);
            None opens an existing cache.

    Raises:
        ConfigError: the folder has no cache, or one of another format.
    """

    def __init__(self, root: str | os.PathLike, manifest: dict[str, Any] | None = None) -> None:
        self.root = Path(root).expanduser()
        path = self.root / "manifest.json"
        if manifest is None:
            if not path.is_file():
                raise ConfigError(f"teacher_cache_dir: {str(self.root)!r} holds no teacher cache "
                                  f"(no manifest.json); make one with tune run tad_cache")
            manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise ConfigError(f"teacher_cache_dir: {str(path)!r} is not a {FORMAT} version "
                              f"{VERSION} manifest")
        self.manifest = manifest
        # the shards read last, memory-mapped: each map holds a file descriptor, so a run over
        # thousands of shards (a 2B-token cache has 3.8K) keeps OPEN_SHARDS, not all of them
        self._open: OrderedDict[tuple[str, int], dict[str, np.ndarray]] = OrderedDict()

    @classmethod
    def create(cls, root: str | os.PathLike, *, top_m: int, vocab_size: int, temperature: float,
               layouts: dict[str, BlockLayout], teacher: dict[str, Any],
               logp_dtype: str = "float16", shard_blocks: int = 256, mode: str = "top_m",
               samples: int | None = None, seed: int | None = None,
               document_mask: bool = False) -> "TeacherCache":
        """Open the cache at ``root`` for writing, making its manifest if it has none. An
        existing manifest must describe the same cache (a resumed ``tad_cache``).

        Raises:
            ConfigError: ``root`` holds a cache made with other settings, naming them.
        """
        if logp_dtype not in LOGP_DTYPES:
            raise ConfigError(f"cache_logp_dtype: must be one of {LOGP_DTYPES}, got {logp_dtype!r}")
        manifest = {
            "format": FORMAT, "version": VERSION, "top_m": int(top_m),
            "vocab_size": int(vocab_size), "temperature": float(temperature),
            "ids_dtype": ids_dtype(vocab_size), "logp_dtype": logp_dtype,
            "shard_blocks": int(shard_blocks), "teacher": teacher,
            "splits": {k: asdict(v) for k, v in layouts.items()},
        }
        if mode != "top_m":  # a bucket cache's manifest is that of the first version
            manifest.update(mode=mode, samples=int(samples), seed=int(seed))
        if document_mask:  # the teacher attended within documents (absent: across them)
            manifest.update(document_mask=True)
        root = Path(root).expanduser()
        path = root / "manifest.json"
        if path.is_file():
            old = json.loads(path.read_text())
            # every key of either manifest: one that only a cache of other settings writes
            # (mode, document_mask) differs as much as one both write
            keys = sorted(old.keys() | manifest.keys())
            implied = {"mode": "top_m"}  # what a manifest without the key means

            def shown(m: dict, k: str) -> Any:
                return m.get(k, implied.get(k))

            diff = [f"{k}: {shown(old, k)!r} there, {shown(manifest, k)!r} now" for k in keys
                    if k != "teacher" and old.get(k) != manifest.get(k)]
            if old.get("teacher") is None or manifest.get("teacher") is None:
                if old.get("teacher") != manifest.get("teacher"):
                    diff.append("teacher: recorded by one, not the other")
            else:  # named by the config key; a moved teacher is the same
                diff += teacher_differences(old["teacher"], manifest["teacher"])
            if diff:
                raise ConfigError(
                    f"teacher_cache_dir: {str(root)!r} holds a cache made with other settings "
                    f"({', '.join(diff)}); give another teacher_cache_dir or delete that one")
        else:
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        return cls(root)

    # ------------------------------------------------------------------------------ the manifest

    @property
    def mode(self) -> str:
        return self.manifest.get("mode", "top_m")

    @property
    def document_mask(self) -> bool:
        """Whether the teacher ran with attention stopping at documents (``document_mask``)."""
        return bool(self.manifest.get("document_mask", False))

    @property
    def top_m(self) -> int:
        return self.manifest["top_m"]

    @property
    def temperature(self) -> float:
        return self.manifest["temperature"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def teacher_id_merges(self) -> dict[int, int] | None:
        """The ``teacher_id_merges`` the cache was made with (None: none; a cache of an
        earlier version records none)."""
        pairs = (self.manifest.get("teacher") or {}).get("teacher_id_merges")
        return {int(k): int(v) for k, v in pairs} if pairs else None

    @property
    def shard_blocks(self) -> int:
        return self.manifest["shard_blocks"]

    def differences(self, settings: dict[str, Any]) -> list[str]:
        """The ``tad_cache`` keys among ``settings`` (``cache_mode``, ``cache_top_m``, ...; None:
        not set) whose value is not this cache's, as ``key=value (the cache's: value)``: a
        ``tad_distill`` run reads the cache as it was made, whatever they say."""
        made = {"cache_mode": self.mode, "cache_top_m": self.top_m,
                "cache_logp_dtype": self.manifest["logp_dtype"]}
        if self.mode != "top_m":
            made.update(cache_samples=self.manifest["samples"], cache_seed=self.manifest["seed"])
        return [f"{key}={settings[key]} (the cache's: {value})" for key, value in made.items()
                if settings.get(key) is not None and str(settings[key]) != str(value)]

    def check_teacher(self, teacher: dict[str, Any]) -> None:
        """Refuse a cache made by another teacher than ``teacher`` (``teacher_identity`` of the
        run): other checkpoint files or other weights in them. The dtype and vocabulary
        alignment it ran with are the cache's, whatever the run's."""
        then = self.manifest.get("teacher")
        differ = teacher_differences(then, teacher, TEACHER_WEIGHTS) if then else []
        if differ:
            raise ConfigError(
                f"{'; '.join(differ)}: the teacher cache {str(self.root)!r} was made by another "
                f"teacher (from {then.get('checkpoint_dir')!r}); accepted: the cache's teacher, "
                f"or a cache of this one (tune run tad_cache into another teacher_cache_dir)")

    def spec(self) -> CacheSpec:
        """What this cache offers a divergence (its ``validate`` hook reads it)."""
        return CacheSpec(mode=self.mode, top_m=self.top_m, temperature=self.temperature,
                         where=f"teacher_cache_dir={str(self.root)!r}")

    def layout(self, split: str) -> BlockLayout:
        if split not in self.manifest["splits"]:
            raise ConfigError(f"teacher_cache_dir: {str(self.root)!r} has no {split!r} split "
                              f"(it has {sorted(self.manifest['splits'])})")
        return BlockLayout(**self.manifest["splits"][split])

    def num_shards(self, split: str) -> int:
        return -(-self.layout(split).num_blocks // self.shard_blocks)

    def remove_stale(self, split: str) -> None:
        """Remove the temporary shard folders that killed writers left (call while no one
        writes)."""
        remove_stale(self.root / split, "shard_*")

    def missing_shards(self, split: str) -> list[int]:
        """Shards of ``split`` not written yet (a complete cache has none)."""
        return [i for i in range(self.num_shards(split))
                if not _shard_dir(self.root, split, i).is_dir()]

    def bytes_per_token(self) -> float:
        """Bytes the cache takes per position."""
        sizes = {"ids": 2 if self.manifest["ids_dtype"] == "uint16" else 4,
                 "logp": 4 if self.manifest["logp_dtype"] == "float32" else 2, "float32": 4}
        width = {"ids": self.top_m, "logp": self.top_m, "draws": self.manifest.get("samples")}
        return sum(sizes[enc] * (width.get(field) or 1) for field, enc in self._fields().items())

    def _fields(self) -> dict[str, str]:
        return MODES[self.mode][1]

    def _encoding(self, field: str) -> str:
        enc = self._fields()[field]
        return {"ids": self.manifest["ids_dtype"], "logp": self.manifest["logp_dtype"]}.get(enc, enc)

    def check(self, split: str, layout: BlockLayout, *, vocab_size: int,
              document_mask: bool = False) -> None:
        """Refuse a cache that does not cover ``layout``'s blocks or the student's vocabulary,
        whose teacher attended otherwise than ``document_mask`` says, or that is incomplete,
        naming what differs."""
        if self.document_mask != document_mask:
            raise ConfigError(
                f"document_mask: {str(document_mask).lower()} here, but the teacher cache "
                f"{str(self.root)!r} was made with document_mask: "
                f"{str(self.document_mask).lower()} (its teacher attended "
                f"{'within' if self.document_mask else 'across'} documents); run tad_cache "
                f"with this config into another teacher_cache_dir")
        mine = self.layout(split)
        if mine != layout:
            then, now = asdict(mine), asdict(layout)
            differ = "; ".join(f"{k} {then[k]!r} there, {now[k]!r} here ({_LAYOUT_CAUSES[k]})"
                               for k in then if then[k] != now[k])
            raise ConfigError(
                f"teacher_cache_dir: {str(self.root)!r} was made for other {split} blocks: "
                f"{differ}; run tad_cache again with this config")
        if self.vocab_size != vocab_size:
            raise ConfigError(f"teacher_cache_dir: {str(self.root)!r} holds ids of a {self.vocab_size}"
                              f"-id vocabulary, the student's has {vocab_size}")
        missing = self.missing_shards(split)
        if missing:
            raise ConfigError(f"teacher_cache_dir: {str(self.root)!r} is incomplete: {len(missing)}"
                              f" of {self.num_shards(split)} {split} shards missing (first "
                              f"{missing[0]}); run tune run tad_cache with the same config to "
                              f"finish it")

    # ------------------------------------------------------------------------------ read, write

    def write_shard(self, split: str, index: int, stats: CacheEntries) -> Path:
        """Publish shard ``index`` of ``split`` (``stats`` ``[blocks, L, ...]``, this cache's
        mode's entries) atomically."""
        final = _shard_dir(self.root, split, index)
        tmp = staging_dir(final)
        for field in self._fields():
            np.save(tmp / f"{field}.npy", _to_numpy(getattr(stats, field), self._encoding(field)))
        publish_dir(tmp, final)  # a shard that exists already holds the same bytes
        return final

    def _shard(self, split: str, index: int) -> dict[str, np.ndarray]:
        key = (split, index)
        if key in self._open:
            self._open.move_to_end(key)
        else:
            folder = _shard_dir(self.root, split, index)
            self._open[key] = {f: np.load(folder / f"{f}.npy", mmap_mode="r")
                               for f in self._fields()}
            if len(self._open) > OPEN_SHARDS:  # its maps close when nothing reads them
                self._open.popitem(last=False)
        return self._open[key]

    def block(self, split: str, index: int) -> CacheEntries:
        """The cached statistics of block ``index`` of ``split``, decoded (``[L, ...]``: ids
        int64, the rest float32), as this cache's mode's entries."""
        shard = self._shard(split, index // self.shard_blocks)
        row = index % self.shard_blocks
        entries = MODES[self.mode][0]
        return entries(*(_from_numpy(shard[f][row], self._encoding(f)) for f in self._fields()))


def encode_round_trip(stats: CacheEntries, logp_dtype: str) -> CacheEntries:
    """``stats`` as the cache stores them (log-probabilities rounded to ``logp_dtype``): what a
    cached loss reads back, for measuring the encoding's error without writing files."""
    logp = _from_numpy(_to_numpy(stats.logp, logp_dtype), logp_dtype)
    return replace(stats, logp=logp.to(stats.logp.device))


class CachedBlocks(torch.utils.data.Dataset):
    """A ``TextBlockDataset`` whose samples also carry their block's cached teacher statistics
    (``sample["teacher"]``, which ``tad_torchtune.data.collate`` stacks into ``Batch.teacher``),
    checked against the cache first (``TeacherCache.check``)."""

    def __init__(self, dataset: Any, cache: TeacherCache, split: str, *, vocab_size: int,
                 document_mask: bool = False) -> None:
        cache.check(split, BlockLayout.of(dataset), vocab_size=vocab_size,
                    document_mask=document_mask)
        self.dataset, self.cache, self.split = dataset, cache, split

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], "teacher": self.cache.block(self.split, index)}

    def __getattr__(self, name: str) -> Any:  # fingerprint, store_path, ... of the dataset
        if name in ("dataset", "cache", "split"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
