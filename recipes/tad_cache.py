"""Run a distillation config's teacher once over its prepared data and keep its statistics.

    tune run tad_cache --config CONFIG teacher_cache_dir=DIR [cache_top_m=32]
    tune run tad_cache --config CONFIG teacher_cache_dir=DIR cache_mode=sampled [cache_samples=32]
    tune run --nproc_per_node 2 tad_cache --config CONFIG teacher_cache_dir=DIR

Reads the SAME config as ``tad_distill``: its tokenizer, ``dataset`` (the training split; the
validation split is scored by the live teacher, so ``val_kl`` stays exact), its teacher
(checkpointer, dtype, family fix-ups such as Gemma2's correction, ``vocab_alignment``) and its
divergence's temperature. For every block of the split it writes, per position, the teacher's
top-``cache_top_m`` ids and log-probabilities and, by ``cache_mode``: the log-mass outside them
and the log-probability of the next token (``top_m``, the bucket cache), or the log-mass and
entropy outside them and ``cache_samples`` ids drawn from there (``sampled``, unbiased for TAD
and forward KL; the default for those, ``top_m`` for the others), in shards of
``cache_shard_blocks`` blocks, each published atomically (``tad_torchtune/teacher_cache.py``
documents the format). With ``document_mask`` the teacher attends within documents, as
``tad_distill`` runs it, and the manifest says so (``tad_distill`` refuses a cache made otherwise
than its ``document_mask``). A run that is interrupted leaves only complete shards: the next
run with the same config writes the missing ones, and the cache is then byte for byte what an
uninterrupted run writes (the draws come from a counter-based generator keyed by the seed, the
block and the position). Under torchrun each process takes its share of the shards, the
teacher sharded with FSDP2 as in ``tad_distill``. Its ``profiler`` block is ``tad_distill``'s,
a step being one batch's teacher forward and statistics: traces in
``output_dir/profiling_outputs``, and after each profiled cycle one line of where a batch's
device time went.
"""

import shutil
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torchtune import config
from tqdm import tqdm

from tad_torchtune.common import DTYPES
from tad_torchtune.data import collate
from tad_torchtune.data.checks import check_row_length
from tad_torchtune.errors import ConfigError, instantiate, reports_user_errors
from tad_torchtune.hardware import warn_if_slow_bf16
from tad_torchtune.head import TeacherHead
from tad_torchtune.losses import CacheSpec, DivergenceUse
from tad_torchtune.losses.cached import teacher_sampled, teacher_top_m
from tad_torchtune.models import supports_flex_attention
from tad_torchtune.models.loading import (
    check_model_fits_checkpoint,
    checkpoint_state,
    hf_config_of,
    load_teacher,
    softcap_of,
    vocab_size_of,
)
from tad_torchtune.parallel import barrier, init_distributed, on_rank0, parallelize
from tad_torchtune.profiling import StepProfiler, describe
from tad_torchtune.schema import (
    DISTILL,
    component_class,
    instantiate_loss,
    resolve_config_argv,
    resolve_package_paths,
    validate_config,
)
from tad_torchtune.teacher_cache import (
    DEFAULT_TOP_M,
    BlockLayout,
    TeacherCache,
    cache_mode_for,
    check_blocks,
    teacher_identity,
)
from tad_torchtune.vocab import check_merges_softcap, check_teacher_id_merges


class TADCacheRecipe:
    """Writes the teacher cache of a ``tad_distill`` config; see the module docstring.

    Args:
        cfg: the validated config; ``teacher_cache_dir`` must be set.
    """

    def __init__(self, cfg: DictConfig) -> None:
        def get(key: str) -> Any:
            return DISTILL.get(cfg, key)

        if not get("teacher_cache_dir"):
            raise ConfigError("teacher_cache_dir: missing; give the folder to write the cache to")
        self._root = Path(str(get("teacher_cache_dir"))).expanduser()
        kd = cfg.get("kd_loss") if get("kd_weight") > 0 else None
        self._mode = get("cache_mode") or cache_mode_for(
            None if kd is None else component_class(cfg, "kd_loss"))
        self._top_m = get("cache_top_m") or DEFAULT_TOP_M[self._mode]
        self._samples = get("cache_samples")
        self._seed = get("cache_seed")
        self._logp_dtype = str(get("cache_logp_dtype"))
        self._shard_blocks = int(get("cache_shard_blocks"))
        self._batch_size = int(get("batch_size"))
        self._max_steps = get("max_steps")
        self._per_step = int(get("gradient_accumulation_steps")) * self._batch_size
        self._device = torch.device(get("device"))
        self._dtype = DTYPES[get("dtype")]
        self._vocab_alignment = get("vocab_alignment")
        self._document_mask = bool(get("document_mask"))
        self._rank, self._world = init_distributed(self._device.type)
        if self._device.type == "cuda":
            self._device = torch.device("cuda", torch.cuda.current_device())
        self._temperature = float(kd.get("temperature", 1.0)) if kd is not None else 1.0
        self._output_dir = Path(str(get("output_dir"))).expanduser()
        self._profiler: StepProfiler | None = None  # set up last
        self._batches = 0  # teacher forwards run, the profiler's steps

    def setup(self, cfg: DictConfig) -> None:
        """Data first (cheap, and it says which blocks there are), then the student's vocabulary
        (from its config, on the meta device: nothing allocated), then the teacher."""
        if self._rank == 0:
            warn_if_slow_bf16(self._device, self._dtype)
        tokenizer = instantiate(cfg.tokenizer, "tokenizer")
        dataset = instantiate(cfg.dataset, "dataset", tokenizer)
        check_blocks(dataset, "dataset")
        self._datasets = {"train": dataset}
        self._note_a_shorter_run(len(dataset))
        self._vocab = vocab_size_of(cfg.student_model)
        if not 1 <= self._top_m < self._vocab:  # before the cache's manifest is written
            raise ConfigError(f"cache_top_m: {self._top_m} ids kept of a vocabulary of "
                              f"{self._vocab}; accepted: 1 to {self._vocab - 1}")
        if cfg.get("kd_loss") is not None and DISTILL.get(cfg, "kd_weight") > 0:
            # the config's divergence must be able to read this cache, before the teacher pass
            spec = CacheSpec(mode=self._mode, top_m=self._top_m, temperature=self._temperature,
                             where=f"the cache this makes: cache_mode={self._mode}, "
                                   f"cache_top_m={self._top_m}")
            instantiate_loss(cfg, "kd_loss", "tad_cache", warn=False).check(DivergenceUse(
                vocab_size=self._vocab, cache=spec, prog="tad_cache"))
        teacher_kwargs = check_model_fits_checkpoint(
            cfg.teacher_model, cfg.teacher_checkpointer, model_key="teacher_model",
            checkpointer_key="teacher_checkpointer")
        teacher_len = teacher_kwargs.get("max_seq_len")
        merges = check_teacher_id_merges(  # before any weight is read
            DISTILL.get(cfg, "teacher_id_merges"),
            teacher_vocab_size=teacher_kwargs.get("vocab_size", 0),
            student_vocab_size=self._vocab, vocab_alignment=self._vocab_alignment)
        if merges is not None:  # Gemma2's caps come from its config.json
            check_merges_softcap(merges, softcap_of(cfg.teacher_model,
                                                    hf_config_of(cfg.teacher_checkpointer)))
        if teacher_len is not None:
            check_row_length(dataset, "dataset", tokenizer, teacher_len)
        # built on the meta device and sharded there: a rank loads only its shards, which
        # rank 0, alone reading the checkpoint, broadcasts on several processes
        state, _ = on_rank0(partial(checkpoint_state, cfg.teacher_checkpointer,
                                    "teacher_checkpointer"))
        teacher = load_teacher(cfg.teacher_model, cfg.teacher_checkpointer, device=self._device,
                               dtype=self._dtype, state=state, from_rank0=self._world > 1,
                               prepare=partial(parallelize, fsdp=self._world > 1))
        del state
        self._flex_attention = supports_flex_attention(self._device, teacher)
        self._teacher = TeacherHead(teacher, vocab_size=self._vocab,
                                    vocab_alignment=self._vocab_alignment, merges=merges)
        self._cache = TeacherCache.create(
            self._root, top_m=self._top_m, vocab_size=self._vocab, temperature=self._temperature,
            layouts={s: BlockLayout.of(d) for s, d in self._datasets.items()},
            teacher=teacher_identity(cfg), logp_dtype=self._logp_dtype,
            shard_blocks=self._shard_blocks, mode=self._mode,
            samples=self._samples if self._mode == "sampled" else None,
            seed=self._seed if self._mode == "sampled" else None,
            document_mask=self._document_mask)
        # last: a profiler started by set-up would record it
        self._profiler = StepProfiler(cfg.get("profiler"), output_dir=self._output_dir,
                                      device=self._device.type)

    def _note_a_shorter_run(self, blocks: int) -> None:
        """One line on rank 0 when the config's ``max_steps`` trains on fewer blocks than the
        training split this caches (every block of it is cached, whatever the run reads)."""
        if self._max_steps is None or self._rank != 0:
            return
        processes = f" x {self._world} processes" if self._world > 1 else ""
        read = self._max_steps * self._per_step * self._world
        if read < blocks:
            print(f"tad_cache: note: max_steps={self._max_steps} trains on {read} of the {blocks} "
                  f"training blocks cached here (max_steps x batch_size x "
                  f"gradient_accumulation_steps{processes}); "
                  f"dataset.max_blocks={read} caches, and trains on, the first {read} only",
                  file=sys.stderr)

    @torch.no_grad()
    def run(self) -> None:
        # what is missing, read by every rank before any rank writes a shard
        if self._rank == 0:
            for split in self._datasets:
                self._cache.remove_stale(split)
        todo = {split: self._cache.missing_shards(split) for split in self._datasets}
        if self._rank == 0:
            self._report_size(todo)
        barrier()
        self._profiler.start()
        for split, dataset in self._datasets.items():
            missing = todo[split]
            mine = missing[self._rank :: self._world]
            # FSDP gathers each block's weights in every forward, so all ranks run the same
            # number of teacher forwards: each round as many batches as its largest shard, the
            # extra ones (and whole extra shards) computed and dropped
            rounds = -(-len(missing) // self._world)
            blocks = sum(self._shard_size(dataset, i) for i in mine)
            length = BlockLayout.of(dataset).max_seq_len
            share = " (rank 0's share)" if self._world > 1 else ""
            progress = tqdm(total=blocks * length, unit="tok", unit_scale=True,
                            disable=self._rank != 0, desc=f"tad_cache {split}{share}")
            start = time.perf_counter()
            for r in range(rounds):
                batches = max(-(-self._shard_size(dataset, i) // self._batch_size)
                              for i in missing[r * self._world:(r + 1) * self._world])
                if r < len(mine):
                    self._cache.write_shard(split, mine[r],
                                            self._shard(dataset, mine[r], batches, progress))
                else:  # this rank's shards are done: the forwards alone, on the first shard
                    self._shard(dataset, missing[0], batches, None, keep=False)
            progress.close()
            if self._rank == 0:
                seconds = max(time.perf_counter() - start, 1e-9)
                # the processes step together (their rounds of FSDP forwards): all of them
                # wrote every missing shard in this time
                tokens = sum(self._shard_size(dataset, i) for i in missing) * length
                print(f"tad_cache: {split}: {len(missing)} of {self._cache.num_shards(split)} "
                      f"shards written ({tokens} tokens, {tokens / seconds:.0f} tokens/s"
                      + (f"; {blocks * length} of them on this process" if self._world > 1
                         else "") + ")", file=sys.stderr)
        self._report_profile(self._profiler.stop())  # a cycle the end cut short
        barrier()
        if self._rank == 0:
            samples = f", samples={self._samples}" if self._mode == "sampled" else ""
            print(f"tad_cache: done; cache in {self._root} (mode={self._mode}, "
                  f"top_m={self._top_m}{samples}, {self._cache.bytes_per_token():.0f} bytes per "
                  f"token)")

    def _report_size(self, todo: dict[str, list[int]]) -> None:
        """One line: what the cache will hold on disk, what is left to write; a warning when
        the disk has less room than that left."""
        per_token = self._cache.bytes_per_token()
        left = total = 0
        for split, dataset in self._datasets.items():
            length = BlockLayout.of(dataset).max_seq_len
            total += len(dataset) * length
            left += sum(self._shard_size(dataset, i) for i in todo[split]) * length
        print(f"tad_cache: {total} tokens at {per_token:.0f} bytes each: "
              f"{_size(total * per_token)} in {str(self._root)!r}, {_size(left * per_token)} of "
              f"it left to write", file=sys.stderr)
        free = shutil.disk_usage(self._root).free
        if free < left * per_token:
            print(f"tad_cache: warning: {str(self._root)!r} has {_size(free)} free, less than "
                  f"the {_size(left * per_token)} left to write; a cache of fewer blocks: "
                  f"dataset.max_blocks", file=sys.stderr)

    def _shard_size(self, dataset, index: int) -> int:
        """Number of blocks in shard ``index`` (the last one may be short)."""
        return min(self._shard_blocks, len(dataset) - index * self._shard_blocks)

    def _shard(self, dataset, index: int, batches: int, progress, keep: bool = True) -> Any:
        """The teacher's top-M of shard ``index`` in exactly ``batches`` teacher forwards: the
        shard's own batches (none with ``keep=False``), then its first batch again, dropped."""
        first = index * self._shard_blocks
        last = first + self._shard_size(dataset, index)
        starts = list(range(first, last, self._batch_size)) if keep else []
        assert len(starts) <= batches, (index, batches)
        parts = []
        for n, start in enumerate(starts + [first] * (batches - len(starts))):
            batch = collate([dataset[i] for i in range(start, min(start + self._batch_size, last))]
                            ).to(self._device)
            # the teacher's attention as tad_distill runs it
            batch = batch.with_attention(self._document_mask, flex=self._flex_attention)
            out = self._teacher(batch, logits=n < len(starts))
            if n < len(starts):
                if self._mode == "sampled":
                    blocks = torch.arange(start, start + batch.tokens.shape[0])
                    parts.append(teacher_sampled(out.logits, self._top_m, self._samples,
                                                 seed=self._seed, blocks=blocks,
                                                 temperature=self._temperature))
                else:
                    parts.append(teacher_top_m(out.logits, batch.labels, self._top_m,
                                               temperature=self._temperature))
                if progress is not None:
                    progress.update(batch.tokens.numel())
            self._batches += 1
            self._report_profile(self._profiler.step())  # on the batch that ends a cycle
        if not keep:
            return None
        return type(parts[0])(*(torch.cat(p).cpu() for p in zip(*(x.tensors() for x in parts))))

    def _report_profile(self, profiled: dict[str, float] | None) -> None:
        """A profiled cycle's reading (``tad_torchtune.profiling``), per batch, printed."""
        if profiled is not None and self._rank == 0:
            tqdm.write(f"tad_cache: batch {self._batches} {describe(profiled)}", file=sys.stderr)

    def cleanup(self) -> None:
        if self._profiler is not None:
            self._profiler.stop()
        if dist.is_initialized():
            dist.destroy_process_group()


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def run(cfg: DictConfig) -> None:
    """``tune run tad_cache`` on a parsed config, in this process."""
    validate_config(cfg)
    resolve_package_paths(cfg)
    recipe = TADCacheRecipe(cfg)
    try:
        recipe.setup(cfg)
        recipe.run()
    finally:
        recipe.cleanup()


@reports_user_errors("tad_cache")
@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point of ``tune run tad_cache --config ...``."""
    run(cfg)


if __name__ == "__main__":
    sys.argv = resolve_config_argv(sys.argv)
    sys.exit(recipe_main())
