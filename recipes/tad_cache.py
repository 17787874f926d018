"""Run a distillation config's teacher once over its prepared data and keep its top-M statistics.

    tune run tad_cache --config CONFIG teacher_cache_dir=DIR [cache_top_m=32]
    tune run --nproc_per_node 2 tad_cache --config CONFIG teacher_cache_dir=DIR

Reads the SAME config as ``tad_distill``: its tokenizer, ``dataset`` (the training split; the
validation split is scored by the live teacher, so ``val_kl`` stays exact), its teacher (checkpointer, dtype, family fix-ups such as Gemma2's correction,
``vocab_alignment``) and its divergence's temperature. For every block of the split it writes
the teacher's top-``cache_top_m`` ids and log-probabilities, the log-mass outside them and the
log-probability of the next token, in shards of ``cache_shard_blocks`` blocks, each published
atomically (``tad_torchtune/teacher_cache.py`` documents the format). A run that is interrupted
leaves only complete shards: the next run with the same config writes the missing ones, and the
cache is then byte for byte what an uninterrupted run writes. Under torchrun each process takes
its share of the shards, the teacher sharded with FSDP2 as in ``tad_distill``.
"""

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training
from tqdm import tqdm

from tad_torchtune.common import DTYPES, shift_labels
from tad_torchtune.config_checks import SCALARS, resolve_config_argv, resolve_package_paths, validate_config
from tad_torchtune.data import collate_blocks
from tad_torchtune.errors import ConfigError, check_checkpoint_files, instantiate, reports_user_errors
from tad_torchtune.losses.cached import TeacherTopM, teacher_top_m
from tad_torchtune.models import build_model, forward_hidden, output_weight, project_logits
from tad_torchtune.parallel import init_distributed, parallelize
from tad_torchtune.teacher_cache import BlockLayout, TeacherCache
from tad_torchtune.vocab import align_teacher_vocab


def _teacher_identity(cfg: DictConfig) -> dict[str, Any]:
    """What identifies the teacher a cache was made with: its model config, its checkpoint
    files (names and sizes), the dtype and the vocabulary alignment."""
    ckpt = cfg.teacher_checkpointer
    folder = Path(str(ckpt.checkpoint_dir))
    files = ckpt.get("checkpoint_files") or []
    return {
        "model": OmegaConf.to_container(cfg.teacher_model, resolve=True),
        "checkpoint_dir": str(folder.resolve()),
        "checkpoint_files": {str(f): (folder / str(f)).stat().st_size for f in files
                             if (folder / str(f)).is_file()},
        "dtype": cfg.get("dtype", SCALARS["dtype"][1]),
        "vocab_alignment": cfg.get("vocab_alignment", SCALARS["vocab_alignment"][1]),
    }


class TADCacheRecipe:
    """Writes the teacher cache of a ``tad_distill`` config; see the module docstring.

    Args:
        cfg: the validated config; ``teacher_cache_dir`` must be set.
    """

    def __init__(self, cfg: DictConfig) -> None:
        def get(key: str) -> Any:
            return cfg.get(key, SCALARS[key][1])

        if not get("teacher_cache_dir"):
            raise ConfigError("teacher_cache_dir: missing; give the folder to write the cache to")
        self._root = Path(str(get("teacher_cache_dir"))).expanduser()
        self._top_m = int(get("cache_top_m"))
        self._logp_dtype = str(get("cache_logp_dtype"))
        self._shard_blocks = int(get("cache_shard_blocks"))
        self._batch_size = int(get("batch_size"))
        self._device = torch.device(get("device"))
        self._dtype = DTYPES[get("dtype")]
        self._vocab_alignment = get("vocab_alignment")
        self._rank, self._world = init_distributed(self._device.type)
        if self._device.type == "cuda":
            self._device = torch.device("cuda", torch.cuda.current_device())
        kd = cfg.get("kd_loss")
        self._temperature = float(kd.get("temperature", 1.0)) if kd is not None else 1.0

    def setup(self, cfg: DictConfig) -> None:
        """Data first (cheap, and it says which blocks there are), then the student's vocabulary
        (from its config, on the meta device: nothing allocated), then the teacher."""
        tokenizer = instantiate(cfg.tokenizer, "tokenizer")
        dataset = instantiate(cfg.dataset, "dataset", tokenizer)
        if not hasattr(dataset, "fingerprint"):
            raise ConfigError("dataset._component_: the teacher cache is aligned to the blocks of a "
                              "prepared store: use tad_torchtune.data.text_block_dataset")
        self._datasets = {"train": dataset}
        with torch.device("meta"):
            student, _ = build_model(cfg.student_model)
        self._vocab = output_weight(student).shape[0]
        check_checkpoint_files(cfg.teacher_checkpointer, "teacher_checkpointer")
        checkpointer = instantiate(cfg.teacher_checkpointer, "teacher_checkpointer")
        state = checkpointer.load_checkpoint()[training.MODEL_KEY]
        path = Path(str(cfg.teacher_checkpointer.checkpoint_dir)) / "config.json"
        hf = json.loads(path.read_text()) if path.is_file() else None
        with training.set_default_dtype(self._dtype):
            self._teacher, _ = build_model(cfg.teacher_model, hf)
        self._teacher.load_state_dict(state)
        del state
        self._teacher.to(self._device).eval().requires_grad_(False)
        parallelize(self._teacher, fsdp=self._world > 1)
        self._cache = TeacherCache.create(
            self._root, top_m=self._top_m, vocab_size=self._vocab, temperature=self._temperature,
            layouts={s: BlockLayout.of(d) for s, d in self._datasets.items()},
            teacher=_teacher_identity(cfg), logp_dtype=self._logp_dtype,
            shard_blocks=self._shard_blocks)

    @torch.no_grad()
    def run(self) -> None:
        # what is missing, read by every rank before any rank writes a shard
        todo = {split: self._cache.missing_shards(split) for split in self._datasets}
        if self._world > 1:
            dist.barrier()
        for split, dataset in self._datasets.items():
            missing = todo[split]
            mine = missing[self._rank :: self._world]
            # FSDP gathers each block's weights in every forward, so all ranks run the same
            # number of teacher forwards: each round as many batches as its largest shard, the
            # extra ones (and whole extra shards) computed and dropped
            rounds = -(-len(missing) // self._world)
            blocks = sum(self._shard_size(dataset, i) for i in mine)
            length = BlockLayout.of(dataset).max_seq_len
            progress = tqdm(total=blocks * length, unit="tok", unit_scale=True,
                            disable=self._rank != 0, desc=f"tad_cache {split}")
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
                seconds = time.perf_counter() - start
                print(f"tad_cache: {split}: {len(missing)} of {self._cache.num_shards(split)} "
                      f"shards written ({blocks * length} tokens on this process, "
                      f"{blocks * length / max(seconds, 1e-9):.0f} tokens/s)", file=sys.stderr)
        if self._world > 1:
            dist.barrier()
        if self._rank == 0:
            print(f"tad_cache: done; cache in {self._root} (top_m={self._top_m}, "
                  f"{self._cache.bytes_per_token():.0f} bytes per token)")

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
            batch = collate_blocks([dataset[i] for i in range(start, min(start + self._batch_size,
                                                                          last))])
            tokens = batch["tokens"].to(self._device)
            labels = shift_labels(batch["labels"]).to(self._device)
            h, _ = forward_hidden(self._teacher, tokens)
            if n >= len(starts):
                continue
            logits = align_teacher_vocab(project_logits(self._teacher, h), self._vocab,
                                         self._vocab_alignment)
            parts.append(teacher_top_m(logits, labels, self._top_m, temperature=self._temperature))
            if progress is not None:
                progress.update(tokens.numel())
        if not keep:
            return None
        return TeacherTopM(*(torch.cat([getattr(p, f) for p in parts]).cpu()
                             for f in ("ids", "logp", "log_rest", "label_logp")))

    def cleanup(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


@reports_user_errors("tad_cache")
@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point of ``tune run tad_cache --config ...``."""
    validate_config(cfg)
    resolve_package_paths(cfg)
    recipe = TADCacheRecipe(cfg)
    try:
        recipe.setup(cfg)
        recipe.run()
    finally:
        recipe.cleanup()


if __name__ == "__main__":
    sys.argv = resolve_config_argv(sys.argv)
    sys.exit(recipe_main())
