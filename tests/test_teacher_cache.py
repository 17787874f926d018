"""The teacher cache on disk (``teacher_cache.py``): shards written and read back in both modes and
every log-probability encoding, its size per position from the real files, the manifest that
refuses another cache's settings, incomplete and stale shards, the samples of ``CachedBlocks``
and what ``check`` refuses. (Writing one with ``tune run tad_cache``, resumed and on two
processes: ``tests/recipes/test_tad_cache.py``.)"""

import json
import warnings

import numpy as np
import pytest
import torch

from tad_torchtune.errors import ConfigError
from tad_torchtune.files import staging_dir
from tad_torchtune.losses import CacheSpec
from tad_torchtune.losses.cached import TeacherSampled, TeacherTopM, teacher_sampled, teacher_top_m
from tad_torchtune.teacher_cache import (
    BlockLayout,
    CachedBlocks,
    TeacherCache,
    encode_round_trip,
)

L = 9  # positions per block
SHARD = 2  # blocks per shard
LAYOUT = BlockLayout(store_fingerprint="f" * 16, first_token=100, max_seq_len=L, num_blocks=5)
TEACHER = {"model": {"_component_": "tiny"}, "dtype": "fp32"}


def _logits(blocks: int, vocab: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(blocks, L, vocab, generator=gen) * 3


def _entries(mode: str, logits: torch.Tensor, first_block: int = 0, top_m: int = 6,
             samples: int = 4):
    """The cache entries of blocks ``[B, L, V]`` as ``tad_cache`` computes them."""
    if mode == "top_m":
        labels = torch.randint(0, logits.shape[-1], logits.shape[:2],
                               generator=torch.Generator().manual_seed(1))
        labels[:, -1] = -100  # a block's last position has no next token
        return teacher_top_m(logits, labels, top_m)
    blocks = torch.arange(first_block, first_block + logits.shape[0])
    return teacher_sampled(logits, top_m, samples, seed=3, blocks=blocks)


def _create(root, mode="top_m", *, vocab=50, logp_dtype="float16", top_m=6, **overrides):
    kwargs = dict(top_m=top_m, vocab_size=vocab, temperature=1.0, layouts={"train": LAYOUT},
                  teacher=TEACHER, logp_dtype=logp_dtype, shard_blocks=SHARD, mode=mode)
    if mode == "sampled":
        kwargs.update(samples=4, seed=3)
    return TeacherCache.create(root, **{**kwargs, **overrides})


def _encoded(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """``x`` rounded to the stored dtype and back to float32."""
    return x.to(getattr(torch, dtype)).float()


@pytest.mark.parametrize("logp_dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("mode", ["top_m", "sampled"])
def test_shards_read_back_what_was_written(tmp_path, mode, logp_dtype):
    cache = _create(tmp_path / "cache", mode, logp_dtype=logp_dtype)
    logits = _logits(LAYOUT.num_blocks, 50)
    written = {}
    for shard in range(3):  # 5 blocks in shards of 2: the last shard holds one block
        blocks = slice(shard * SHARD, min((shard + 1) * SHARD, LAYOUT.num_blocks))
        entries = _entries(mode, logits[blocks], first_block=blocks.start)
        cache.write_shard("train", shard, entries)
        for i in range(blocks.start, blocks.stop):
            written[i] = type(entries)(*(x[i - blocks.start] for x in entries.tensors()))
    again = TeacherCache(tmp_path / "cache")  # opened from its manifest, as tad_distill does
    assert again.mode == mode and again.missing_shards("train") == []
    for i, want in written.items():
        with warnings.catch_warnings():  # the read-only memory map is never shared with torch
            warnings.simplefilter("error")
            got = again.block("train", i)
        for x in got.tensors():  # each entry owns its memory: writable, the files untouched
            x.add_(0)
        assert type(got) is {"top_m": TeacherTopM, "sampled": TeacherSampled}[mode]
        assert torch.equal(got.ids, want.ids) and got.ids.dtype == torch.int64
        assert torch.equal(got.logp, _encoded(want.logp, logp_dtype))
        assert got.logp.dtype == torch.float32
        others = [f for f in ("log_rest", "label_logp", "log_tail", "entropy") if hasattr(want, f)]
        for field in others:  # stored in float32: exact
            assert torch.equal(getattr(got, field), getattr(want, field).float()), field
        if mode == "sampled":
            assert torch.equal(got.draws, want.draws)
        # what a cached loss reads, without the files
        assert torch.equal(encode_round_trip(want, logp_dtype).logp, got.logp)
    if logp_dtype != "float32":  # the encoding is lossy, and the test can see it
        assert not torch.equal(again.block("train", 0).logp, written[0].logp.float())


@pytest.mark.parametrize("mode,vocab,per_position", [
    ("top_m", 50, 4 * 6 + 8),  # the design's 4 M + 8 (uint16 ids, float16)
    ("sampled", 50, 4 * 6 + 8 + 2 * 4),  # 4 K + 8 + 2 S
    ("sampled", 70_000, 6 * 6 + 8 + 4 * 4),  # int32 ids past 65,536: 6 K + 8 + 4 S
])
def test_bytes_per_token_is_what_the_files_hold(tmp_path, mode, vocab, per_position):
    cache = _create(tmp_path / "cache", mode, vocab=vocab)
    cache.write_shard("train", 0, _entries(mode, _logits(SHARD, vocab)))
    arrays = [np.load(p, mmap_mode="r") for p in (tmp_path / "cache" / "train" / "shard_000000")
              .glob("*.npy")]
    on_disk = sum(a.nbytes for a in arrays) / (SHARD * L)
    assert cache.bytes_per_token() == on_disk == per_position


def test_an_existing_cache_of_other_settings_is_refused_naming_them(tmp_path):
    root = tmp_path / "cache"
    _create(root)
    _create(root)  # the same settings: a resumed tad_cache opens it
    with pytest.raises(ConfigError) as err:
        _create(root, top_m=8, logp_dtype="float32")
    assert str(err.value) == (
        f"teacher_cache_dir: {str(root)!r} holds a cache made with other settings (logp_dtype: "
        f"'float16' there, 'float32' now, top_m: 6 there, 8 now); give another "
        f"teacher_cache_dir or delete that one")
    with pytest.raises(ConfigError, match=r"\(mode: 'top_m' there, 'sampled' now, samples: None "
                                          r"there, 4 now, seed: None there, 3 now\)"):
        _create(root, "sampled")
    sampled = _create(tmp_path / "sampled", "sampled")  # keys a bucket cache does not write
    with pytest.raises(ConfigError, match=r"\(mode: 'sampled' there, 'top_m' now, samples: 4 "
                                          r"there, None now, seed: 3 there, None now\)"):
        _create(sampled.root)
    masked = _create(tmp_path / "masked", document_mask=True)
    with pytest.raises(ConfigError, match=r"\(document_mask: True there, None now\)"):
        _create(masked.root)
    with pytest.raises(ConfigError, match=r"\(document_mask: None there, True now\)"):
        _create(root, document_mask=True)
    assert masked.document_mask and not _create(root).document_mask
    with pytest.raises(ConfigError, match=r"cache_logp_dtype: must be one of \('float16', "
                                          r"'bfloat16', 'float32'\), got 'int8'"):
        _create(tmp_path / "other", logp_dtype="int8")


def _teacher_files(folder, seed, size=300_000):
    """A teacher's identity (``teacher_identity``'s form) with one checkpoint file of ``size``
    random bytes of ``seed`` in ``folder``."""
    from tad_torchtune.teacher_cache import sampled_digest

    folder.mkdir(exist_ok=True)
    path = folder / "model.safetensors"
    path.write_bytes(np.random.default_rng(seed).bytes(size))
    return {**TEACHER, "checkpoint_dir": str(folder), "checkpoint_files": {
        "model.safetensors": {"size": size, "sampled_sha256": sampled_digest(path)}}}


def test_a_teacher_is_its_weights_wherever_they_are(tmp_path):
    """The cache's teacher is compared by its checkpoint contents (size and a digest of blocks
    spread over each file): moved or copied it is the same, other weights of the same size are
    another teacher; a cache of an earlier version (sizes only) compares sizes, and one that
    recorded no file (torchtune's filename_format form) none; the model config, another
    spelling of which is the same teacher, and the dtype only for a resumed tad_cache."""
    import os
    import shutil

    from tad_torchtune.teacher_cache import (
        DIGEST_BLOCK_BYTES,
        TEACHER_WEIGHTS,
        sampled_digest,
        teacher_differences,
    )

    made = _teacher_files(tmp_path / "a", 0)
    moved = tmp_path / "b"
    shutil.copytree(tmp_path / "a", moved)
    os.utime(moved / "model.safetensors", (1e9, 1e9))
    assert teacher_differences(made, {**made, "checkpoint_dir": str(moved)}) == []
    assert sampled_digest(moved / "model.safetensors") == sampled_digest(
        tmp_path / "a" / "model.safetensors")
    other = _teacher_files(tmp_path / "c", 1)  # another seed, the same size
    assert teacher_differences(made, other) == [
        "teacher_checkpointer.checkpoint_files: 'model.safetensors' holds other weights than "
        "the cache's teacher's (size 300000, the cache's 300000; another content digest)"]
    # the digest reads blocks from the start to the end: a change in the last one is seen
    data = bytearray((moved / "model.safetensors").read_bytes())
    data[-DIGEST_BLOCK_BYTES // 2] ^= 1
    (moved / "model.safetensors").write_bytes(bytes(data))
    assert sampled_digest(moved / "model.safetensors") != made["checkpoint_files"][
        "model.safetensors"]["sampled_sha256"]
    old = {**made, "checkpoint_files": {"model.safetensors": 300000}}  # an earlier cache's
    assert teacher_differences(old, other) == []
    assert teacher_differences({**old, "checkpoint_files": {"model.safetensors": 7}}, other)
    run = {**made, "model": {"_component_": "big"}, "dtype": "bf16"}
    assert teacher_differences(made, run, TEACHER_WEIGHTS) == []
    assert teacher_differences(made, run) == [  # a resumed tad_cache
        "teacher_model: {'_component_': 'big'}, the cache's teacher {'_component_': 'tiny'}",
        "dtype: 'bf16', the cache's teacher 'fp32'"]
    merged = {**made, "teacher_id_merges": [[32000, 2]]}
    assert teacher_differences(made, merged, TEACHER_WEIGHTS) == []
    assert teacher_differences(made, merged) == [  # an earlier cache records no merges: none
        "teacher_id_merges: [[32000, 2]], the cache's teacher None"]
    assert teacher_differences(merged, {**made, "teacher_id_merges": None}) == [
        "teacher_id_merges: None, the cache's teacher [[32000, 2]]"]
    assert teacher_differences(made, {**made, "checkpoint_files": {}}) == [
        "teacher_checkpointer.checkpoint_files: [], the cache's teacher ['model.safetensors']"]
    two = {"a.safetensors": {"size": 1, "sampled_sha256": "x"},
           "b.safetensors": {"size": 2, "sampled_sha256": "y"}}
    assert teacher_differences({**made, "checkpoint_files": two}, {**made, "checkpoint_files":
                                                                  dict(reversed(two.items()))}) == []
    assert teacher_differences({**made, "checkpoint_files": {}}, other) == []  # recorded none


def test_a_cache_of_another_teacher_is_refused_on_resume_and_for_training(tmp_path):
    """tad_cache resuming into a cache that another teacher began (weights written over the
    checkpoint in place), and tad_distill reading a cache of another teacher: one line naming
    the key (before, the cache mixed two teachers' shards, and training read it silently)."""
    made = _teacher_files(tmp_path / "t", 0)
    cache = _create(tmp_path / "cache", teacher=made)
    _create(tmp_path / "cache", teacher={**made, "checkpoint_dir": "/moved"})  # the same one
    cache.check_teacher({**made, "checkpoint_dir": "/moved", "dtype": "bf16"})
    other = _teacher_files(tmp_path / "t", 1)
    why = ("teacher_checkpointer.checkpoint_files: 'model.safetensors' holds other weights than "
           "the cache's teacher's (size 300000, the cache's 300000; another content digest)")
    with pytest.raises(ConfigError) as err:
        _create(tmp_path / "cache", teacher=other)
    assert str(err.value) == (
        f"teacher_cache_dir: {str(tmp_path / 'cache')!r} holds a cache made with other settings "
        f"({why}); give another teacher_cache_dir or delete that one")
    with pytest.raises(ConfigError) as err:
        cache.check_teacher(other)
    assert str(err.value) == (
        f"{why}: the teacher cache {str(tmp_path / 'cache')!r} was made by another teacher "
        f"(from {str(tmp_path / 't')!r}); accepted: the cache's teacher, or a cache of this one "
        f"(tune run tad_cache into another teacher_cache_dir)")


def test_a_folder_without_a_cache_or_with_another_format_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"holds no teacher cache \(no manifest.json\); make one "
                                          r"with tune run tad_cache"):
        TeacherCache(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something", "version": 1}))
    with pytest.raises(ConfigError, match="is not a tad_torchtune.teacher_cache version 1 "
                                          "manifest"):
        TeacherCache(tmp_path)


def test_missing_shards_and_stale_leftovers(tmp_path):
    cache = _create(tmp_path / "cache")
    assert cache.num_shards("train") == 3 and cache.missing_shards("train") == [0, 1, 2]
    cache.write_shard("train", 1, _entries("top_m", _logits(SHARD, 50)))
    assert cache.missing_shards("train") == [0, 2]
    stale = staging_dir(tmp_path / "cache" / "train" / "shard_000002")  # a killed writer's
    (stale / "ids.npy").write_bytes(b"half")
    cache.remove_stale("train")
    assert sorted(p.name for p in (tmp_path / "cache" / "train").iterdir()) == ["shard_000001"]
    assert cache.missing_shards("train") == [0, 2]


class Blocks:
    """What ``CachedBlocks`` reads of a ``TextBlockDataset``: its layout and its samples."""

    fingerprint = LAYOUT.store_fingerprint

    def __init__(self, num_blocks=LAYOUT.num_blocks, max_seq_len=L, first_token=100):
        self.n, self.len, self.first = num_blocks, max_seq_len, first_token

    def __len__(self):
        return self.n

    def token_span(self, index):
        start = self.first + index * self.len
        return start, start + self.len

    def __getitem__(self, index):
        return {"tokens": torch.arange(self.len) + index, "labels": torch.arange(self.len)}


def _complete(tmp_path, mode="top_m"):
    cache = _create(tmp_path / "cache", mode)
    logits = _logits(LAYOUT.num_blocks, 50)
    for shard in range(3):
        blocks = slice(shard * SHARD, min((shard + 1) * SHARD, LAYOUT.num_blocks))
        cache.write_shard("train", shard, _entries(mode, logits[blocks], blocks.start))
    return cache


def test_cached_blocks_carry_their_blocks_statistics(tmp_path):
    cache = _complete(tmp_path, "sampled")
    data = CachedBlocks(Blocks(), cache, "train", vocab_size=50)
    assert len(data) == LAYOUT.num_blocks and data.fingerprint == LAYOUT.store_fingerprint
    for i in (0, 3, 4):
        sample = data[i]
        assert torch.equal(sample["tokens"], torch.arange(L) + i)
        want = cache.block("train", i)
        assert all(torch.equal(a, b) for a, b in zip(sample["teacher"].tensors(), want.tensors()))
    assert BlockLayout.of(Blocks()) == LAYOUT
    assert cache.spec() == CacheSpec(mode="sampled", top_m=6, temperature=1.0,
                                     where=f"teacher_cache_dir={str(tmp_path / 'cache')!r}")


def test_check_refuses_other_blocks_another_vocabulary_and_an_incomplete_cache(tmp_path):
    cache = _complete(tmp_path)
    root = repr(str(tmp_path / "cache"))
    CachedBlocks(Blocks(), cache, "train", vocab_size=50)  # passes
    with pytest.raises(ConfigError) as err:
        CachedBlocks(Blocks(max_seq_len=L + 1), cache, "train", vocab_size=50)
    assert str(err.value) == (f"teacher_cache_dir: {root} was made for other train blocks: "
                              f"max_seq_len 9 there, 10 here (another dataset.max_seq_len); run "
                              f"tad_cache again with this config")
    with pytest.raises(ConfigError) as err:
        CachedBlocks(Blocks(), cache, "train", vocab_size=60)
    assert str(err.value) == (f"teacher_cache_dir: {root} holds ids of a 50-id vocabulary, the "
                              f"student's has 60")
    with pytest.raises(ConfigError, match=r"has no 'validation' split \(it has \['train'\]\)"):
        cache.layout("validation")
    half = _create(tmp_path / "half")
    half.write_shard("train", 1, _entries("top_m", _logits(SHARD, 50)))
    with pytest.raises(ConfigError) as err:
        CachedBlocks(Blocks(), half, "train", vocab_size=50)
    assert str(err.value) == (f"teacher_cache_dir: {str(tmp_path / 'half')!r} is incomplete: 2 of "
                              f"3 train shards missing (first 0); run tune run tad_cache with the "
                              f"same config to finish it")


def test_a_config_without_cache_mode_gets_the_cache_its_divergence_reads_best():
    """``cache_mode: null``: the sampled cache (unbiased, benchmarks/RESULTS.md) for TAD and
    forward KL, the bucket for reverse KL and DRKL (which draws cannot serve) and without one."""
    from tad_torchtune.losses import DRKLLoss, ForwardKLLoss, ReverseKLLoss, TADLoss
    from tad_torchtune.teacher_cache import cache_mode_for

    assert [cache_mode_for(c) for c in (TADLoss, ForwardKLLoss, ReverseKLLoss, DRKLLoss, None)] \
        == ["sampled", "sampled", "top_m", "top_m", "top_m"]


def test_a_reader_keeps_a_bounded_number_of_shards_open(tmp_path, monkeypatch):
    """Reading blocks of more shards than ``OPEN_SHARDS`` in a shuffled order keeps that many
    memory-mapped (each map a file descriptor: a 2B-token cache has thousands of shards, and
    the common limit is 1024 open files), and every block reads what was written."""
    import os
    import random

    from tad_torchtune import teacher_cache

    monkeypatch.setattr(teacher_cache, "OPEN_SHARDS", 4)
    blocks = 40  # 20 shards of 2 blocks
    layout = BlockLayout(store_fingerprint="f" * 16, first_token=0, max_seq_len=L,
                         num_blocks=blocks)
    cache = _create(tmp_path / "cache", layouts={"train": layout})
    logits = _logits(blocks, 50)
    written = _entries("top_m", logits)
    for shard in range(blocks // SHARD):
        rows = slice(shard * SHARD, (shard + 1) * SHARD)
        cache.write_shard("train", shard, type(written)(*(t[rows] for t in written.tensors())))
    reader = TeacherCache(tmp_path / "cache")
    fds = len(os.listdir("/proc/self/fd"))
    order = list(range(blocks)) * 2
    random.Random(0).shuffle(order)
    most = 0
    for i in order:
        got = reader.block("train", i)
        assert torch.equal(got.ids, written.ids[i].long())
        most = max(most, len(os.listdir("/proc/self/fd")) - fds)
    assert len(reader._open) == 4
    assert most <= 4 * len(reader._fields()) + 2, most  # 20 shards read: 5x more before


def test_two_spellings_of_one_teacher_model_are_the_same_teacher():
    """A resumed ``tad_cache`` compares the teacher's model by what it builds: the demo's
    written node, ``hf_decoder`` of its folder and another ``max_seq_len`` are one teacher;
    another depth is not."""
    from omegaconf import OmegaConf

    from tad_torchtune.cli import shipped_configs
    from tad_torchtune.data import resolve_asset
    from tad_torchtune.teacher_cache import teacher_differences

    written = OmegaConf.to_container(OmegaConf.load(shipped_configs()["demo"]).teacher_model,
                                     resolve=True)
    folder = {"_component_": "tad_torchtune.models.hf_decoder",
              "checkpoint_dir": resolve_asset("pkg://demo/teacher")}
    made = {"model": written, "dtype": "fp32", "vocab_alignment": "exact", "checkpoint_files": {}}
    for same in (folder, {**written, "max_seq_len": 4096}):
        assert teacher_differences(made, {**made, "model": same}) == []
    deeper = {**written, "num_layers": 5}
    assert teacher_differences(made, {**made, "model": deeper}) == [
        f"teacher_model: {deeper!r}, the cache's teacher {written!r}"]
