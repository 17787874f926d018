"""Full-parameter knowledge distillation of a torchtune decoder into a smaller one.

    tune run tad_distill --config demo
    tune run --nproc_per_node 2 tad_distill --config path/to/config.yaml key=value ...

The objective of one optimizer step is

    (clm_weight * CE + kd_weight * kd_loss + hidden_weight * hidden_loss) summed over the valid
    tokens of every micro-batch on every process, divided by their global count,

so (batch 8, accumulation 1), (batch 2, accumulation 4) and (batch 4 on 2 processes) give the same
update (``docs/design.md``, "Reduction"). ``kd_loss`` is any divergence of ``tad_torchtune.losses``
(TAD, forward KL, reverse KL, DRKL): swapping one for another is one YAML line or
``kd_loss._component_=tad_torchtune.losses.ForwardKLLoss`` on the command line.

The teacher and the student run through ``tad_torchtune.head`` (``TeacherHead``,
``StudentHead``), which owns the losses, the fused head and the held-out metrics; this file sets
things up in order and steps them. With ``teacher_cache_dir`` the divergence reads the teacher's
statistics cached by ``tad_cache`` instead of running the teacher (``docs/design.md``, "The teacher
cache"); with ``document_mask`` attention stops at the documents of the token store's blocks.

Single process, or FSDP2 under torchrun (NCCL on CUDA, gloo on CPU). Training state is saved
with ``torch.distributed.checkpoint`` atomically every ``save_every_n_steps``, with the token
store's fingerprint; with ``resume_from_checkpoint: true`` a run continues from its newest
complete checkpoint, on the same or another number of processes, and logs the same losses it
would have logged uninterrupted. A run sent SIGTERM (a scheduler's preemption, ``scancel``) saves
a checkpoint at the end of the step it is in, on every process at the same step, and exits with
status 143, as SIGTERM's default would (under torchrun, whose agent passes the signal on, the
agent's own status follows): ``resume_from_checkpoint: true`` continues from there. torchrun
kills the processes 30 s after it passes the signal on (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` where
torch reads it); rank 0 says once when a checkpoint takes longer.
Errors a user can cause end the run with one line naming the config key
(``tad_torchtune.errors``).
"""

import json
import math
import os
import resource
import signal
import sys
import threading
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchtune import config, training
from tqdm import tqdm

from tad_torchtune.checkpointing import TrainingCheckpointer, rng_state, set_rng_state
from tad_torchtune.common import DTYPES, full_tensor
from tad_torchtune.data import (SAMPLE_ORDERS, Batch, ResumableBatchSampler, TextBlockDataset,
                                 collate)
from tad_torchtune.data.checks import (
    build_dataset,
    check_batch,
    check_held_out,
    check_row_length,
    data_cut,
    same_rows,
)
from tad_torchtune.errors import ConfigError, input_files, instantiate, reports_user_errors
from tad_torchtune.files import atomic_write_text, hold_lock, lock_holder
from tad_torchtune.flops import peak_flops, step_flops_per_token
from tad_torchtune.hardware import warn_if_slow_bf16
from tad_torchtune.head import StudentHead, TeacherHead
from tad_torchtune.losses import DivergenceUse
from tad_torchtune.models import prepended_bos_id, save_hf_checkpoint, supports_flex_attention
from tad_torchtune.models.loading import (
    check_model_fits_checkpoint,
    check_student_source,
    checkpoint_state,
    hf_config_of,
    load_student,
    load_teacher,
    sizes_of,
    softcap_of,
    state_vocab_size,
)
from tad_torchtune.parallel import (
    barrier,
    init_distributed,
    on_rank0,
    parallelize,
    preemption_grace_s,
    shutdown_timeout_settable,
)
from tad_torchtune.profiling import OUTSIDE_STEPS, StepProfiler, describe
from tad_torchtune.schema import (
    DISTILL,
    check_hidden_layers,
    divergence_node,
    instantiate_loss,
    resolve_config_argv,
    resolve_package_paths,
    validate_config,
)
from tad_torchtune.teacher_cache import (
    CACHE_KEYS,
    CachedBlocks,
    TeacherCache,
    check_blocks,
    teacher_identity,
)
from tad_torchtune.vocab import (
    check_merges_softcap,
    check_teacher_id_merges,
    check_teacher_tokenizer,
    check_vocab_compat,
)


#: the file in ``output_dir`` whose lock a run holds (``_lock_output_dir``)
RUN_LOCK = ".tad_distill.lock"


class NonFiniteError(RuntimeError):
    """A loss or gradient norm that is not finite: the optimizer step was not taken."""


class Stopped(Exception):
    """The run was sent SIGTERM: it saved its state after the step it was in.

    Attributes:
        step: the step saved.
        checkpoint: the checkpoint's folder.
    """

    #: exit status of a stopped run: SIGTERM's default (128 + 15)
    EXIT = 128 + signal.SIGTERM

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        super().__init__(step, checkpoint)
        self.step, self.checkpoint = step, checkpoint


def changed_settings(then: dict[str, Any], now: dict[str, Any], step: int) -> list[str]:
    """What a resume at ``step`` does with settings that differ from the checkpoint's run, one
    line each: the optimizer's state (its learning rate and hyperparameters) and the scheduler's
    are the checkpoint's; the schedule follows this run's length, and a length that ends at or
    before ``step`` trains nothing; the loss and the teacher's ``teacher_id_merges`` are this
    run's."""
    lines = []
    if "optimizer" in then and then["optimizer"] != now["optimizer"]:
        lines.append(f"optimizer: {now['optimizer']} differs from the checkpoint's run "
                     f"{then['optimizer']}; its optimizer state is restored, its learning rate "
                     f"and hyperparameters included: this run's optimizer settings do not apply")
    if "lr_scheduler" in then and then["lr_scheduler"] != now["lr_scheduler"]:
        lines.append(f"lr_scheduler: {now['lr_scheduler']} differs from the checkpoint's run "
                     f"{then['lr_scheduler']}; the checkpoint's scheduler state is loaded into "
                     f"this run's scheduler")
    if now["total_steps"] <= step:  # no schedule's change is ever reached
        lines.append(f"max_steps, epochs: this run ends at step {now['total_steps']}, at or "
                     f"before the checkpoint's step {step}: nothing trains, and the "
                     f"checkpoint's student is exported")
    elif (now.get("lr_scheduler") is not None and "total_steps" in then
            and then["total_steps"] != now["total_steps"]):
        lines.append(f"max_steps, epochs: this run is {now['total_steps']} steps, the "
                     f"checkpoint's {then['total_steps']}: the schedule is this run's, so the "
                     f"learning rate changes at step {step + 1} (not where the checkpoint's run "
                     f"would have had it)")
    if "kd_loss" in then and then["kd_loss"] != now["kd_loss"]:
        lines.append(f"kd_loss: {now['kd_loss']} differs from the checkpoint's run "
                     f"{then['kd_loss']}: the loss (and its curve in metrics.jsonl) changes at "
                     f"step {step + 1}")
    if ("teacher_id_merges" in then and then["teacher_id_merges"] != now["teacher_id_merges"]
            and now["total_steps"] > step):
        # from a teacher cache training reads the cache's merges (said at set-up): only the
        # live teacher of validation changes
        what = ("validation's teacher (val_kl) changes; training reads the teacher cache as it "
                "was made" if now.get("from_cache") else
                f"the teacher's distribution over the student's ids, so the loss, changes at "
                f"step {step + 1}")
        lines.append(f"teacher_id_merges: {now['teacher_id_merges']} differs from the "
                     f"checkpoint's run {then['teacher_id_merges']}: {what}")
    for key in ("dataset", "tokenizer"):  # a token store's data is checked by its fingerprint
        if key in then and then[key] != now[key]:
            lines.append(f"{key}: {now[key]} differs from the checkpoint's run {then[key]}: "
                         f"the data position goes on over this run's samples")
    return lines


class TADDistillRecipe:
    """Distils ``teacher_model`` into ``student_model``; see the module docstring.

    Args:
        cfg: the validated config (``tad_torchtune.schema.validate_config``).
    """

    def __init__(self, cfg: DictConfig) -> None:
        def get(key: str) -> Any:
            return DISTILL.get(cfg, key)

        self._device = torch.device(get("device"))
        self._dtype = DTYPES[get("dtype")]
        self._rank, self._world_size = init_distributed(self._device.type,
                                                        bool(get("fsdp_cpu_offload")))
        self._is_rank_zero = self._rank == 0
        if self._device.type == "cuda":
            self._device = torch.device("cuda", torch.cuda.current_device())
        self._output_dir = Path(cfg.output_dir)
        self._seed = int(get("seed"))  # set in setup, after the config's checks

        self._clm_weight = float(get("clm_weight"))
        self._kd_weight = float(get("kd_weight"))
        self._hidden_weight = float(get("hidden_weight"))
        pairs = get("hidden_layers") or ([[-1, -1]] if self._hidden_weight > 0 else [])
        if self._hidden_weight == 0 and pairs:
            self._warn(f"hidden_layers: {pairs} unused: hidden_weight is 0 (no hidden loss); "
                       f"hidden_weight > 0 compares them")
            pairs = []
        self._student_hidden_layers = tuple(int(p[0]) for p in pairs)
        self._teacher_hidden_layers = tuple(int(p[1]) for p in pairs)
        self._fused = bool(get("fused"))
        fused_only = [key for key in ("fused_teacher_cache_mib", "fused_float32_weight_grad")
                      if key in cfg]
        if fused_only and not self._fused:
            self._warn(f"{', '.join(fused_only)}: unused: fused is false (they set the fused "
                       f"head, which fused: true runs)")
        self._teacher_cache_mib = get("fused_teacher_cache_mib")  # a number, or None: a row
        self._float32_weight_grad = bool(get("fused_float32_weight_grad"))
        self._loss_chunk_size = int(get("loss_chunk_size"))
        self._vocab_alignment = get("vocab_alignment")
        self._id_merges = get("teacher_id_merges")

        self._batch_size = int(get("batch_size"))
        self._grad_accum = int(get("gradient_accumulation_steps"))
        self._clip_grad_norm = get("clip_grad_norm")
        self._epochs = int(get("epochs"))
        self._max_steps_per_epoch = get("max_steps_per_epoch")
        self._max_steps = get("max_steps")
        self._shuffle = bool(get("shuffle"))
        self._compile = bool(get("compile"))
        self._activation_checkpointing = bool(get("enable_activation_checkpointing"))
        self._cpu_offload = bool(get("fsdp_cpu_offload"))
        self._save_every = get("save_every_n_steps")
        self._eval_every = get("eval_every_n_steps")
        self._max_eval_batches = get("max_eval_batches")
        self._log_every = int(get("log_every_n_steps"))
        self._resume = bool(get("resume_from_checkpoint"))
        self._export_hf = bool(get("export_hf"))
        self._log_peak_memory = bool(get("log_peak_memory_stats"))
        self._keep_last = int(get("keep_last_n_checkpoints"))
        self._document_mask = bool(get("document_mask"))
        self._resume_on_different_data = bool(get("resume_on_different_data"))
        self._teacher_cache_dir = get("teacher_cache_dir")
        self._peak_flops = get("peak_flops_per_device") or peak_flops(self._device, self._dtype)
        self._flops_per_token: dict[int, int] = {}

        self._profiler: StepProfiler | None = None  # set up last
        # SIGTERM's request (``train``), and the step's all-reduced answer: stop after this step
        self._stop_requested = self._stopping = False
        # under torchrun (its agent is this process's parent): the launcher whose death stops
        # the run (``_launcher_gone``); a process started otherwise has no such parent
        self._launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        self._run_lock = None  # rank 0's lock of output_dir (``_lock_output_dir``)
        self._warned_slow_save = False
        self._warned_export = False
        self._warned_no_position: set[str] = set()  # "train", "validation": warned once each
        self.global_step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.tokens_seen = 0
        self.train_seconds = 0.0  # the optimizer steps' own time, summed over resumes

    # ------------------------------------------------------------------------------------ setup

    def setup(self, cfg: DictConfig) -> None:
        """Build everything in dependency order, the cheap checks first: the output folder, the
        components and checkpoints the config names and the divergence's checks (from the
        student's config), then logging (a config refused writes nothing: an output folder this
        run made is removed again), the data (a wrong dataset
        stops the run before any checkpoint is read), the vocabulary checks (from the teacher
        checkpoint's shapes, before any weight is placed), the teacher, then the student
        (initialised from the teacher's weights), each built on the meta device, parallelised
        there and then loaded (a rank receives only its FSDP shards), the optimizer (over the
        sharded trainable parameters), and last the resume, which overwrites model, optimizer,
        scheduler and data position."""
        made = self._is_rank_zero and not self._output_dir.exists()
        try:
            self._setup(cfg)
        except BaseException:
            if made:
                self._remove_output_dir_if_unused()
            raise

    def _remove_output_dir_if_unused(self) -> None:
        """``output_dir``, made by this run, removed when nothing but its lock is in it."""
        if self._run_lock is not None:
            self._run_lock.close()
            self._run_lock = None
        try:
            if {p.name for p in self._output_dir.iterdir()} <= {RUN_LOCK}:
                (self._output_dir / RUN_LOCK).unlink(missing_ok=True)
                self._output_dir.rmdir()
        except OSError:
            pass

    def _setup(self, cfg: DictConfig) -> None:
        started = time.perf_counter()
        self._metric_logger = None
        self._metrics_file = None
        if self._is_rank_zero:
            for folder, what in ((self._output_dir, "a folder"),  # now, not after training
                                 (self._output_dir / "student", "the student's export folder")):
                if folder.exists() and not folder.is_dir():
                    raise ConfigError(f"output_dir: {str(folder)!r} is a file; it must be "
                                      f"{what} or not exist")
            self._output_dir.mkdir(parents=True, exist_ok=True)
            self._run_lock = self._lock_output_dir()
            earlier = (TrainingCheckpointer(self._output_dir / "checkpoints").latest()
                       if not self._resume else None)
            if earlier is not None:  # a restart that forgot to resume
                raise ConfigError(
                    f"output_dir: {str(self._output_dir)!r} holds an earlier run's checkpoints "
                    f"(the newest: {earlier.name}); resume_from_checkpoint=true continues it; "
                    f"to start over, delete {str(earlier.parent)!r} or choose another output_dir")

        self._tokenizer = instantiate(cfg.tokenizer, "tokenizer")
        teacher_tokenizer = (instantiate(cfg.teacher_tokenizer, "teacher_tokenizer")
                             if cfg.get("teacher_tokenizer") is not None else None)

        # From a teacher cache the teacher runs only to score the validation split (val_kl stays
        # exact); its weights still initialise a pruned student.
        self._teacher_cache = (TeacherCache(self._teacher_cache_dir)
                               if self._teacher_cache_dir else None)
        if self._teacher_cache is not None:
            differ = self._teacher_cache.differences(
                {key: cfg.get(key) for key in CACHE_KEYS})  # those the config sets
            if differ:
                self._warn(f"{', '.join(differ)}: tad_cache's keys shape a cache as it is made; "
                           f"this run reads the one in {str(self._teacher_cache.root)!r} as it is")
        # the models against their checkpoints' config.json, before any weight is read
        teacher_kwargs = check_model_fits_checkpoint(
            cfg.teacher_model, cfg.teacher_checkpointer, model_key="teacher_model",
            checkpointer_key="teacher_checkpointer")
        self._student_vocab, student_layers, student_len, student_width = sizes_of(
            cfg.student_model)
        # before any weight is read, and before the cache's teacher identity records them
        self._merges = check_teacher_id_merges(
            self._id_merges, teacher_vocab_size=teacher_kwargs.get("vocab_size", 0),
            student_vocab_size=self._student_vocab, vocab_alignment=self._vocab_alignment)
        teacher_hf = hf_config_of(cfg.teacher_checkpointer)
        if self._merges is not None:  # Gemma2's caps come from its config.json
            check_merges_softcap(self._merges, softcap_of(cfg.teacher_model, teacher_hf))
        # the tokenizers too, where config.json gave the teacher's size (else after the read)
        if teacher_hf is not None:
            self._check_tokenizers(teacher_tokenizer, teacher_kwargs.get("vocab_size"))
        if self._teacher_cache is not None:  # its checkpoint files checked: the cache's?
            self._teacher_cache.check_teacher(teacher_identity(cfg))
            made = self._teacher_cache.teacher_id_merges
            if made != (self._merges.as_config() if self._merges else None):
                self._warn(f"teacher_id_merges: {self._id_merges!r}, the teacher "
                           f"cache's {made!r}: training reads the cache's teacher as it was "
                           f"made, validation's live teacher merges as this config says")
        # rows longer than either model's RoPE tables cannot run (checked per batch too)
        self._max_seq_len = min(n for n in (student_len, teacher_kwargs.get("max_seq_len"))
                                if n is not None)
        if self._hidden_weight > 0:
            check_hidden_layers(
                self._student_hidden_layers, self._teacher_hidden_layers,
                student_layers=student_layers, teacher_layers=teacher_kwargs["num_layers"])
            if student_width != teacher_kwargs["embed_dim"]:
                raise ConfigError(
                    f"hidden_loss: it compares hidden states of one width, but student_model's "
                    f"are {student_width} wide and teacher_model's {teacher_kwargs['embed_dim']}; "
                    f"accepted: a student of the teacher's embed_dim, or hidden_weight: 0")
        if cfg.get("student_checkpointer") is not None:
            check_model_fits_checkpoint(cfg.student_model, cfg.student_checkpointer,
                                        model_key="student_model",
                                        checkpointer_key="student_checkpointer")
        else:
            check_student_source(cfg.student_model, cfg.teacher_checkpointer)
        kd_loss = (instantiate_loss(cfg, "kd_loss", "tad_distill", warn=self._is_rank_zero)
                   if self._kd_weight > 0 else None)
        hidden_loss = (instantiate_loss(cfg, "hidden_loss", "tad_distill")
                       if self._hidden_weight > 0 else None)
        if kd_loss is not None:
            kd_loss.check(DivergenceUse(
                vocab_size=self._student_vocab, fused=self._fused,
                cache=None if self._teacher_cache is None else self._teacher_cache.spec(),
                packed_rows=bool(cfg.dataset.get("packed", False))))

        # the config checked: the run's record and logs
        if self._is_rank_zero:
            logger_cfg = cfg.get("metric_logger") or OmegaConf.create({
                "_component_": "torchtune.training.metric_logging.DiskLogger",
                "log_dir": str(self._output_dir / "logs"),
            })
            self._metric_logger = instantiate(logger_cfg, "metric_logger")
            OmegaConf.save(cfg, self._output_dir / "config.yaml")
            self._metric_logger.log_config(cfg)
            warn_if_slow_bf16(self._device, self._dtype)
        training.set_seed(self._seed)

        # The data before the checkpoints: a wrong dataset stops the run before one is read
        self._data_fingerprints: dict[str, str | None] = {}
        self._data_cut: dict[str, Any] = {}
        self._train_loader, self._train_sampler = self._setup_data(cfg, "dataset", train=True)
        self._val_loader = None
        if cfg.get("validation_dataset") is not None:
            self._val_loader, _ = self._setup_data(cfg, "validation_dataset", train=False)
            check_held_out(self._train_loader.dataset, self._val_loader.dataset)
            warning = same_rows(cfg.dataset, cfg.validation_dataset)
            if warning:
                self._warn(warning)
        elif self._eval_every:
            self._warn(f"eval_every_n_steps={self._eval_every} with no validation_dataset: no "
                       f"validation runs (give a validation_dataset for val_kl)")
        self._steps_per_epoch = len(self._train_sampler) // self._grad_accum
        if self._max_steps_per_epoch is not None:
            self._steps_per_epoch = min(self._steps_per_epoch, self._max_steps_per_epoch)
        if self._steps_per_epoch < 1:
            raise ValueError(
                f"dataset: {self._train_sampler.num_samples} samples make no optimizer step of "
                f"batch_size {self._batch_size} x gradient_accumulation_steps {self._grad_accum} "
                f"x {self._world_size} processes"
            )
        self._total_steps = self._epochs * self._steps_per_epoch
        if self._max_steps is not None:
            self._total_steps = min(self._total_steps, self._max_steps)
        # what a resume restores from the checkpoint or recomputes: its changes are told
        self._settings = {key: OmegaConf.to_container(cfg[key], resolve=True)
                          if isinstance(cfg.get(key), DictConfig) else cfg.get(key)
                          for key in ("optimizer", "lr_scheduler", "kd_loss", "dataset",
                                      "tokenizer")}
        if self._kd_weight > 0:  # the divergence as built: without another one's keys
            self._settings["kd_loss"] = OmegaConf.to_container(divergence_node(cfg)[0],
                                                               resolve=True)
        self._settings["total_steps"] = self._total_steps
        self._settings.update(teacher_id_merges=self._merges.as_config() if self._merges else None,
                              from_cache=self._teacher_cache is not None)

        # On several processes rank 0 alone reads the teacher's checkpoint (and builds the
        # student's fresh weights) and broadcasts them: one host copy per machine, not per rank.
        fsdp = self._world_size > 1
        teacher_state, teacher_vocab = on_rank0(
            partial(checkpoint_state, cfg.teacher_checkpointer, "teacher_checkpointer"),
            state_vocab_size)
        check_vocab_compat(teacher_vocab_size=teacher_vocab,
                           student_vocab_size=self._student_vocab,
                           vocab_alignment=self._vocab_alignment)
        if teacher_hf is None:
            self._check_tokenizers(teacher_tokenizer, teacher_vocab)

        # The models are built on the meta device and sharded there; each rank then loads only
        # its shards (models/loading.py). FSDP's CPU offload keeps the shards on the host.
        shard_device = torch.device("cpu") if fsdp and self._cpu_offload else None
        self._teacher = self._teacher_head = None
        if self._teacher_cache is None or cfg.get("validation_dataset") is not None:
            self._teacher = load_teacher(
                cfg.teacher_model, cfg.teacher_checkpointer, device=self._device,
                dtype=self._dtype, state=teacher_state, shard_device=shard_device,
                from_rank0=fsdp, prepare=partial(parallelize, compile=self._compile, fsdp=fsdp,
                                                 cpu_offload=self._cpu_offload))
            self._teacher_head = TeacherHead(
                self._teacher, vocab_size=self._student_vocab,
                vocab_alignment=self._vocab_alignment, hidden_layers=self._teacher_hidden_layers,
                merges=self._merges)

        def shard_student(student: nn.Module) -> None:
            # the StudentHead is the student's FSDP root: the fused head reads the output weight
            self._head = StudentHead(
                student, kd_loss=kd_loss, hidden_loss=hidden_loss,
                clm_weight=self._clm_weight, kd_weight=self._kd_weight,
                hidden_weight=self._hidden_weight, hidden_layers=self._student_hidden_layers,
                fused=self._fused, chunk_size=self._loss_chunk_size,
                teacher_cache_mib=self._teacher_cache_mib,
                float32_weight_grad=self._float32_weight_grad, compile=self._compile,
                from_cache=self._teacher_cache is not None,
            )
            parallelize(student, activation_checkpointing=self._activation_checkpointing,
                        compile=self._compile, fsdp=fsdp, cpu_offload=self._cpu_offload,
                        root=self._head)

        self._student, self._hf_source_dir, self._hf_model_type = load_student(
            cfg.student_model, teacher_state=teacher_state,
            teacher_checkpointer=cfg.teacher_checkpointer,
            student_checkpointer=cfg.get("student_checkpointer"), device=self._device,
            dtype=self._dtype, seed=self._seed, prepare=shard_student, shard_device=shard_device,
            from_rank0=fsdp)
        del teacher_state
        self._hf_base_config = json.loads((self._hf_source_dir / "config.json").read_text())
        # the export's tokenizer files: the student's source folder's, else those of the folder
        # of the tokenizer the data was encoded with
        self._tokenizer_sources = [self._hf_source_dir, *dict.fromkeys(
            Path(path).expanduser().parent for path in input_files(cfg.tokenizer).values())]

        # document masks (document_mask, torchtune's packed rows): a flex BlockMask where
        # torchtune runs flex attention on every model (CUDA, no Gemma2), which skips the
        # blocks no document reaches; else the dense mask
        models = [m for m in (self._teacher, self._student) if m is not None]
        self._flex_attention = supports_flex_attention(self._device, *models)
        trainable = [p for p in self._head.parameters() if p.requires_grad]
        self._optimizer = instantiate(cfg.optimizer, "optimizer", trainable)
        self._lr_scheduler = None
        if cfg.get("lr_scheduler") is not None:
            self._lr_scheduler = instantiate(
                cfg.lr_scheduler, "lr_scheduler", self._optimizer,
                num_training_steps=self._total_steps)

        self._checkpointer = TrainingCheckpointer(
            self._output_dir / "checkpoints", rank=self._rank, keep_last=self._keep_last)
        self._loaded_step = None  # the step of the checkpoint resumed from
        if self._resume:
            self._load_training_state()
        # rank 0 reads metrics.jsonl; every rank learns whether it holds this step's validation
        # (the end-of-run validation, a collective, runs on every rank or on none)
        _, validated = on_rank0(self._trim_metrics, lambda validated: validated)
        self._validated_step = self.global_step if validated else None
        # last: a profiler started by set-up would record it
        self._profiler = StepProfiler(cfg.get("profiler"), output_dir=self._output_dir,
                                      device=self._device.type)
        if self._is_rank_zero:
            print(self._setup_line(time.perf_counter() - started), file=sys.stderr, flush=True)

    def _check_tokenizers(self, teacher_tokenizer: Any, teacher_vocab: int | None) -> None:
        """``vocab.check_teacher_tokenizer`` against ``tokenizer``, its warnings told."""
        if teacher_vocab is None:
            return
        for line in check_teacher_tokenizer(teacher_tokenizer, self._tokenizer, teacher_vocab,
                                            self._student_vocab, self._vocab_alignment,
                                            self._merges):
            self._warn(line)

    def _setup_line(self, seconds: float) -> str:
        """One line of what set-up built: its time, the models' sizes, the run's length, and
        rank 0's memory (on a GPU what the models and optimizer hold there; FSDP's shards)."""
        def count(params) -> str:  # the whole models' sizes (a DTensor's numel is global)
            n = sum(p.numel() for p in params)
            return next(f"{n / unit:.3g}{name}" for unit, name in
                        ((1e9, "B"), (1e6, "M"), (1e3, "K"), (1, "")) if n >= unit or unit == 1)

        student = list(self._head.parameters())
        teacher = ("teacher " + count(self._teacher.parameters()) if self._teacher is not None
                   else "teacher cache " + str(self._teacher_cache_dir))
        if self._device.type == "cuda":
            memory = f"{torch.cuda.memory_allocated(self._device) / 2**30:.2f} GiB on {self._device}"
        else:
            memory = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
        where = (f"{self._world_size} x {self._device.type} (FSDP2)" if self._world_size > 1
                 else str(self._device))
        return (f"tad_distill: set up in {seconds:.1f} s on {where}: {teacher}, student "
                f"{count(student)} ({count(p for p in student if p.requires_grad)} trainable), "
                f"{str(self._dtype).removeprefix('torch.')}; {self._total_steps} "
                f"step{'s' if self._total_steps != 1 else ''} of "
                f"{self._batch_size * self._grad_accum * self._world_size} sequences from step "
                f"{self.global_step}; rank 0: {memory}")

    def _setup_data(self, cfg: DictConfig, key: str, *, train: bool):
        dataset = build_dataset(cfg[key], key, self._tokenizer)
        check_row_length(dataset, key, self._tokenizer, self._max_seq_len)
        blocks = isinstance(dataset, TextBlockDataset)
        self._data_fingerprints[key] = dataset.fingerprint if blocks else None
        self._data_cut[key] = data_cut(dataset)
        if train and self._teacher_cache is not None:
            check_blocks(dataset, key)
            dataset = CachedBlocks(dataset, self._teacher_cache, "train",
                                   vocab_size=self._student_vocab,
                                   document_mask=self._document_mask)
        if train:
            sampler = ResumableBatchSampler(
                len(dataset), batch_size=self._batch_size, rank=self._rank,
                world_size=self._world_size, shuffle=self._shuffle, seed=self._seed,
            )
        else:
            # Every held-out sample exactly once over all ranks, whatever their number.
            own = list(range(self._rank, len(dataset), self._world_size))
            sampler = [own[i : i + self._batch_size] for i in range(0, len(own), self._batch_size)]
            # Every rank runs as many batches as the first (FSDP gathers in each forward): the
            # others repeat their first batch with no token counted, a rank with no block of
            # its own (fewer blocks than processes) block 0's.
            self._val_batches = len(sampler)
            most = -(-(-(-len(dataset) // self._world_size)) // self._batch_size)
            sampler += (sampler[:1] or [[0]]) * (most - len(sampler))
        pad_id = getattr(self._tokenizer, "pad_id", None)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=0,
                            collate_fn=partial(collate, pad_id=pad_id or 0))
        return loader, sampler

    # --------------------------------------------------------------------------------- training

    def _all_reduce(self, values: Tensor) -> Tensor:
        if self._world_size > 1:
            dist.all_reduce(values)
        return values

    def train(self) -> None:
        """Optimizer steps until ``epochs`` / ``max_steps``, with logging, validation and
        checkpoints; a non-finite loss or gradient norm raises ``NonFiniteError`` before the
        optimizer touches the weights."""
        self._optimizer.zero_grad(set_to_none=True)
        progress = tqdm(total=self._total_steps, initial=self.global_step,
                        disable=not self._is_rank_zero, desc="tad_distill", dynamic_ncols=True)
        self._profiler.start()
        previous = self._catch_sigterm()
        try:
            self._train_loop(progress)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        progress.close()
        self._log_profile(self._profiler.stop())  # a cycle the end cut short
        # the step resumed from and nothing trained since (a finished run resumed): its
        # checkpoint is there; rewriting it would only open a window for a kill
        saved = self._due(self._save_every) or self.global_step == self._loaded_step
        if self._stopping:
            if not saved:
                self.save(export=False)
            raise Stopped(self.global_step, self._checkpointer.latest())
        if (self._val_loader is not None and not self._due(self._eval_every)
                and self.global_step != self._validated_step):  # a resume of a finished run
            self._log(self.evaluate())
        if not saved:
            self.save(export=False)  # the final export follows
        self.export(self._output_dir / "student")

    def _lock_output_dir(self) -> Any:
        """Hold ``output_dir``'s lock for this run (rank 0): a second run in the same folder at
        once (a resume started while an earlier run's processes still train, orphaned by a
        killed launcher) would write the same checkpoints and metrics; refused in one line."""
        path = self._output_dir / RUN_LOCK
        try:
            return hold_lock(path)
        except BlockingIOError:
            raise ConfigError(
                f"output_dir: {str(self._output_dir)!r} is in use by another tad_distill run "
                f"(process {lock_holder(path)}); wait for it to end or stop it (SIGTERM saves "
                f"its state), or choose another output_dir") from None

    def _launcher_gone(self) -> bool:
        """Whether the torchrun launcher that started this process has died (its processes are
        in sessions of their own, so a SIGKILL of it leaves them training, orphaned): such a
        run stops after its step with its state saved, as on SIGTERM."""
        return self._launcher is not None and os.getppid() != self._launcher

    def _due(self, every: int | None) -> bool:
        """Whether the step just taken is one of every ``every`` (evaluation, checkpoints)."""
        return bool(every) and self.global_step % every == 0

    def _catch_sigterm(self) -> Any:
        """From now on SIGTERM asks the run to stop after its step (``Stopped``); returns the
        handler it replaces (None where signals cannot be caught: not the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def request_stop(signum, frame) -> None:
            self._stop_requested = True

        return signal.signal(signal.SIGTERM, request_stop)

    def _train_loop(self, progress: tqdm) -> None:
        while self.epoch < self._epochs and self.global_step < self._total_steps:
            self._train_sampler.set_position(
                self.epoch, self.step_in_epoch * self._grad_accum * self._train_sampler.global_batch
            )
            batches = iter(self._train_loader)
            while self.step_in_epoch < self._steps_per_epoch and self.global_step < self._total_steps:
                self.train_step(batches, progress)
                self._log_profile(self._profiler.step())  # on the step that ends a cycle
                evaluate, save = self._due(self._eval_every), self._due(self._save_every)
                if evaluate or save:  # not a step's: left out of the profile and the bar's rate
                    with torch.profiler.record_function(OUTSIDE_STEPS):
                        if evaluate:
                            self._log(self.evaluate())
                        if save:
                            self.save()
                    progress.unpause()
                if self._stopping:
                    return
            if self.step_in_epoch >= self._steps_per_epoch:
                self.epoch += 1
                self.step_in_epoch = 0

    def train_step(self, batches: Iterator[Batch], progress: tqdm | None = None
                   ) -> dict[str, float]:
        """One optimizer step as ``train`` runs it: the micro-batches fetched from ``batches``
        and prepared, the step (``_train_step``), its throughput and MFU, the progress bar, and
        the metrics when it is a logging step. Returns the step's metrics."""
        t0 = time.perf_counter()
        micro = [self._prepare(next(batches)) for _ in range(self._grad_accum)]
        log = self._train_step(micro, sum(b.num_tokens for b in micro))
        seconds = time.perf_counter() - t0
        self.global_step += 1
        self.step_in_epoch += 1
        self.tokens_seen += int(log["step_tokens"])
        self.train_seconds += seconds
        if not log["step_tokens"]:
            self._warn_no_position("train", f"step {self.global_step} trained on")
        log.update(self._speed(micro, log["step_tokens"], seconds))
        if progress is not None:
            progress.update(1)
            progress.set_postfix(self._postfix(log))
        if self.global_step % self._log_every == 0 or self.global_step == self._total_steps:
            self._log(log)
        return log

    def _speed(self, micro: list[Batch], valid_tokens: float,
               seconds: float) -> dict[str, float]:
        """Throughput of a step: valid tokens/s over all processes and per device, and MFU
        (``tad_torchtune.flops``: model FLOPs of every position this process processed, against
        one device's ``peak_flops_per_device``)."""
        out = {"tokens_per_second": valid_tokens / seconds,
               "tokens_per_second_per_device": valid_tokens / seconds / self._world_size}
        if self._peak_flops:
            flops = 0
            for batch in micro:
                rows, length = batch.tokens.shape
                if length not in self._flops_per_token:
                    self._flops_per_token[length] = step_flops_per_token(
                        self._student, self._teacher if self._head.needs_teacher else None, length,
                        teacher_projects=self._kd_weight > 0)  # else its hidden states alone
                flops += self._flops_per_token[length] * rows * length
            out["mfu"] = flops / seconds / self._peak_flops
        return out

    @staticmethod
    def _postfix(log: dict[str, float]) -> dict[str, str]:
        postfix = {"loss": f"{log['loss']:.4f}", "lr": f"{log['lr']:.2e}",
                   "tok/s": f"{log['tokens_per_second']:.0f}"}
        if "mfu" in log:
            postfix["mfu"] = f"{log['mfu']:.1%}"
        return postfix

    def _prepare(self, batch: Batch) -> Batch:
        """A collated batch on the device, with document-masked attention when asked for
        (``document_mask``) or packed (torchtune's packed rows); checked on the host first
        (``check_batch``: its rows fit the models, its ids their vocabulary)."""
        check_batch(batch, max_seq_len=self._max_seq_len, vocab_size=self._student_vocab)
        return batch.to(self._device).with_attention(self._document_mask,
                                                     flex=self._flex_attention)

    def _train_step(self, micro: list[Batch], local_tokens: int) -> dict[str, float]:
        global_tokens = local_tokens
        if self._world_size > 1:
            global_tokens = int(self._all_reduce(torch.tensor(
                [local_tokens], dtype=torch.float64, device=self._device))[0])
        # FSDP averages gradients over ranks; scaling by world_size turns that into a sum, so the
        # update is (global sum of token losses) / (global token count).
        scale = self._world_size / max(global_tokens, 1)
        sums, names = None, []
        for batch in micro:
            teacher = (self._teacher_head(batch, logits=self._head.needs_teacher_logits)
                       if self._head.needs_teacher else None)
            terms = self._head(batch, teacher)
            (terms.objective * scale).backward()
            names = sorted(terms.stats)
            zero = terms.ce.new_zeros(())
            part = torch.stack([terms.ce, zero if terms.kd is None else terms.kd,
                                zero if terms.hidden is None else terms.hidden,
                                *(terms.stats[k] for k in names)]).double()
            sums = part if sums is None else sums + part
            # the teacher's output (unfused: its [B, T, V] logits) is freed before the next
            # micro-batch's teacher forward and the optimizer step, not after
            del teacher, terms
        # the stop request travels with the sums: every process stops after the same step
        if not self._stop_requested and self._launcher_gone():
            self._stop_requested = True
            tqdm.write(f"tad_distill: rank {self._rank}: the launcher (process "
                       f"{self._launcher}) is gone: stopping after this step, its state saved",
                       file=sys.stderr)
        stop = sums.new_full((1,), float(self._stop_requested))
        reduced = self._all_reduce(torch.cat([sums, stop]))
        sums, stop = reduced[:-1] / max(global_tokens, 1), reduced[-1:]

        max_norm = self._clip_grad_norm if self._clip_grad_norm is not None else float("inf")
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(
            [p for p in self._head.parameters() if p.requires_grad], max_norm))
        # the step's one host synchronisation (besides the token count of several processes);
        # the norm is on the gradients' device: the CPU under FSDP2's CPU offload
        values = torch.cat([sums, stop, grad_norm.double().reshape(1).to(sums.device)]).tolist()
        (ce, kd_mean, hidden_mean), stats, grad_norm = values[:3], values[3:-2], values[-1]
        self._stopping = values[-2] > 0
        loss_value = (self._clm_weight * ce + self._kd_weight * kd_mean
                      + self._hidden_weight * hidden_mean)
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            self._optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(
                f"step {self.global_step + 1}: loss {loss_value} / gradient norm {grad_norm} is "
                f"not finite; the optimizer step was not taken and the last checkpoint "
                f"({self._checkpointer.latest()}) is intact"
            )
        if global_tokens:  # a step with nothing to learn leaves the weights and moments be
            self._optimizer.step()  # (AdamW would decay the weights and the moments)
        self._optimizer.zero_grad(set_to_none=True)
        lr = self._optimizer.param_groups[0]["lr"]
        if self._lr_scheduler is not None:
            self._lr_scheduler.step()
        log = {"loss": loss_value, "ce": ce, "lr": lr, "grad_norm": grad_norm,
               "step_tokens": float(global_tokens)}
        if self._head.kd_loss is not None:
            log["kd_loss"] = kd_mean
            log.update({f"kd/{k}": v for k, v in zip(names, stats)})
        if self._head.hidden_loss is not None:
            log["hidden_loss"] = hidden_mean
        return log

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out KL(teacher || student), student cross-entropy and perplexity, top-1 agreement,
        over the whole validation set (or ``max_eval_batches`` per rank), with the metrics of
        ``tad_eval`` (``tad_torchtune.metrics.StudentMetrics``), summed over the processes."""
        if self._val_loader is None:
            return {}
        self._student.eval()
        metrics = self._head.new_metrics(calibration=False)
        total = len(self._val_loader)
        if self._max_eval_batches is not None:
            total = min(total, self._max_eval_batches)
        # its own bar under the training's, gone when done (a whole split can take minutes)
        bar = tqdm(self._val_loader, total=total, desc="validation", leave=False,
                   disable=not self._is_rank_zero, dynamic_ncols=True)
        for i, batch in enumerate(bar):
            if self._max_eval_batches is not None and i >= self._max_eval_batches:
                break
            batch = self._prepare(batch)
            if i >= self._val_batches:  # a rank with fewer batches runs the others' FSDP steps
                batch = batch.ignoring_all()
            self._head.evaluate(batch, self._teacher_head(batch, logits=not self._fused), metrics)
        bar.close()
        self._student.train()
        out = metrics.all_reduce().compute()
        if not out["num_tokens"]:  # no val_* record: its means would be NaN
            self._warn_no_position("validation", f"the validation at step {self.global_step} "
                                   "scored")
            return {}
        return {"val_kl": out["kl"], "val_ce": out["ce"], "val_ppl": out["ppl"],
                "val_top1_agreement": out["top1_agreement"],
                # what they are means over: max_eval_batches caps batches of batch_size rows
                # per process, so another batch or process count scores another share
                "val_tokens": int(out["num_tokens"])}

    # ------------------------------------------------------------------ checkpoints and logging

    def save(self, export: bool = True) -> None:
        """Training state (DCP, atomic) and, if ``export_hf``, the student as an HF checkpoint."""
        meta = {
            "global_step": self.global_step, "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch, "tokens_seen": self.tokens_seen,
            "train_seconds": self.train_seconds,
            "samples_in_epoch": self.step_in_epoch * self._grad_accum * self._train_sampler.global_batch,
            "sample_order": self._train_sampler.order,
            "lr_scheduler": self._lr_scheduler.state_dict() if self._lr_scheduler else None,
            "rng": rng_state(), "world_size": self._world_size,
            "data": self._data_fingerprints, "data_cut": self._data_cut,
            "settings": self._settings,
        }
        start = time.perf_counter()
        path = self._checkpointer.save(self.global_step, self._head, self._optimizer, meta)
        self._warn_if_preemption_cannot_save(time.perf_counter() - start)
        if export and self._export_hf:
            self.export(path / "hf")

    def _warn(self, message: str) -> None:
        """One warning line on rank 0's stderr, above the progress bar while there is one."""
        if self._is_rank_zero:
            tqdm.write(f"tad_distill: warning: {message}", file=sys.stderr)

    def _warn_no_position(self, split: str, what: str) -> None:
        """Once per split, on rank 0: a step or a validation without a single label to learn
        or score (its metrics would be 0 or NaN, silently)."""
        if split in self._warned_no_position:
            return
        self._warned_no_position.add(split)
        key = "dataset" if split == "train" else "validation_dataset"
        self._warn(f"{what} no position: every label of its {key} rows is ignored (a prompt "
                   f"that fills tokenizer.max_seq_len with train_on_input: false leaves no "
                   f"answer token to learn; told once)")

    def _warn_if_preemption_cannot_save(self, seconds: float) -> None:
        """Once, on rank 0: a checkpoint took longer than torchrun waits after passing a
        SIGTERM on, so a preempted run would be killed while saving it and resume from the one
        before (nothing corrupt: a checkpoint is published whole or not at all)."""
        grace = preemption_grace_s()
        if self._warned_slow_save or grace is None or seconds <= grace:
            return
        self._warned_slow_save = True
        remedy = (f"set TORCH_ELASTIC_SHUTDOWN_TIMEOUT to {math.ceil(2 * seconds)} or more"
                  if shutdown_timeout_settable() else "this torch's torchrun cannot wait longer")
        self._warn(f"the checkpoint of step {self.global_step} took {seconds:.0f} s; torchrun "
                   f"kills the processes {grace} s after it passes a SIGTERM on, so a preempted "
                   f"run would resume from the checkpoint before; {remedy}")

    def export(self, out_dir: Path) -> None:
        """The student as a Hugging Face checkpoint (safetensors + its own config.json), with
        tokenizer files that put first the BOS training's tokenizer did."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            self._head.student,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )
        if self._is_rank_zero:
            # what the export says of its tokenizer files: one line, at the run's first export
            # (every later one would say it of another folder)
            told = self._warned_export
            save_hf_checkpoint(
                self._student, out_dir, base_config=self._hf_base_config,
                model_type=self._hf_model_type, state_dict=state,
                copy_files_from=self._tokenizer_sources,
                add_bos_id=prepended_bos_id(self._tokenizer),
                warn=lambda message: None if told else self._warn(f"{message} (told once)"),
            )
            self._warned_export = True
        barrier()

    def _load_training_state(self) -> None:
        # rank 0 alone reads the folder and every rank gets its choice: all load the same
        # checkpoint, whatever each would have seen of it
        _, (path, skipped) = on_rank0(self._checkpointer.newest, lambda found: found)
        for line in skipped:
            self._warn(line)
        if path is None:
            if self._is_rank_zero:
                print(f"resume_from_checkpoint: no checkpoint in {self._checkpointer.root}; "
                      "starting from scratch", file=sys.stderr)
            return
        meta = self._checkpointer.load(path, self._head, self._optimizer)
        self._check_same_data(meta.get("data") or {}, meta.get("data_cut") or {}, path)
        for line in changed_settings(meta.get("settings") or {}, self._settings,
                                     meta["global_step"]):
            self._warn(line)
        self.global_step, self.epoch = meta["global_step"], meta["epoch"]
        self._loaded_step = self.global_step
        self.tokens_seen = meta["tokens_seen"]
        self.train_seconds = float(meta.get("train_seconds", 0.0))  # earlier versions saved none
        per_step = self._grad_accum * self._train_sampler.global_batch
        if meta["samples_in_epoch"] % per_step:
            raise ValueError(
                f"resume_from_checkpoint: the checkpoint stopped after {meta['samples_in_epoch']} "
                f"samples of epoch {self.epoch}, not a multiple of this run's "
                f"{per_step} samples per optimizer step (batch_size x gradient_accumulation_steps "
                "x processes)"
            )
        self.step_in_epoch = meta["samples_in_epoch"] // per_step
        # the order the run began in: earlier versions' checkpoints record none (randperm)
        order = meta.get("sample_order", "randperm")
        if order not in SAMPLE_ORDERS:
            raise ConfigError(
                f"resume_from_checkpoint: {str(path)!r} orders its samples by {order!r}, which "
                f"this version does not know; accepted: checkpoints ordered by one of "
                f"{SAMPLE_ORDERS} (resume with the version that wrote it)")
        self._train_sampler.order = order
        if self._lr_scheduler is not None and meta["lr_scheduler"] is not None:
            self._lr_scheduler.load_state_dict(meta["lr_scheduler"])
            # the next step's rate from THIS run's schedule (a resume with a larger max_steps has
            # another one), not the rate the checkpoint's optimizer state carries
            with warnings.catch_warnings():  # get_lr outside step(): the rate we want here
                warnings.filterwarnings("ignore", message="To get the last learning rate")
                rates = self._lr_scheduler.get_lr()
            for group, lr in zip(self._optimizer.param_groups, rates):
                group["lr"] = lr
        set_rng_state(meta["rng"])
        if self._is_rank_zero:
            print(f"resumed from {path} at step {self.global_step}", file=sys.stderr)

    def _trim_metrics(self) -> bool:
        """Drop the records of ``metrics.jsonl`` after this run's starting step: those an
        interrupted run logged after its last checkpoint (the resume logs them again), or all of
        an earlier run's in a run that starts from scratch; one file, one record per step. Read
        line by line (twice when some go): memory does not grow with the run's length.

        Returns:
            Whether a kept record is the validation of the starting step (a finished run's,
            logged after its last checkpoint: ``train`` does not log it again).
        """
        path = self._output_dir / "metrics.jsonl"
        if not path.is_file():
            return False

        def kept(line: str) -> bool:
            return bool(line.strip()) and _record_step(line) <= self.global_step

        dropped, validated = 0, False
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not kept(line):
                    dropped += 1
                elif _record_step(line) == self.global_step:
                    validated |= "val_kl" in json.loads(line)
        if not dropped:
            return validated
        with open(path, encoding="utf-8") as f:
            atomic_write_text(path, (line.rstrip("\n") + "\n" for line in f if kept(line)))
        print(f"metrics.jsonl: {dropped} record(s) after step {self.global_step} dropped from "
              f"{str(path)!r} (this run logs from step {self.global_step + 1})", file=sys.stderr)
        return validated

    def _check_same_data(self, saved: dict[str, str | None], saved_cut: dict[str, Any],
                         path: Path) -> None:
        """Refuse to resume on a token store other than the checkpoint's (other data or another
        tokenizer), or on other training samples of it (another number of samples, block
        length or token range: the data position would index other samples), unless
        ``resume_on_different_data``."""
        if self._resume_on_different_data:
            return
        for key, now in self._data_fingerprints.items():
            then = saved.get(key)
            if then is None or now is None or then == now:
                continue
            raise ConfigError(
                f"{key}: the checkpoint {str(path)!r} was trained on the token store "
                f"{then} and this run's is {now} (other data or another tokenizer); "
                f"resume_on_different_data=true resumes anyway")
        then, now = saved_cut.get("dataset"), self._data_cut.get("dataset")
        if then is not None and now is not None and then != now:
            why = ("another max_seq_len, validation_fraction or split" if "max_seq_len" in now
                   else "other data files or another dataset or tokenizer setting")
            raise ConfigError(
                f"dataset: the checkpoint {str(path)!r} was trained on {then} and this run "
                f"cuts {now} ({why}): its data position would index other samples; "
                f"resume_on_different_data=true resumes anyway")

    def _log_profile(self, profiled: dict[str, float] | None) -> None:
        """A profiled cycle's metrics (``tad_torchtune.profiling``), logged and printed."""
        if profiled is None:
            return
        self._log(profiled)
        if self._is_rank_zero:
            tqdm.write(f"tad_distill: step {self.global_step} {describe(profiled)}")

    def _log(self, values: dict[str, float]) -> None:
        """One record of ``metrics.jsonl`` (and of ``metric_logger``): ``step``, ``tokens`` (valid
        tokens trained on), ``train_seconds`` (the optimizer steps' own time, without evaluation
        and checkpoints, summed over resumes: the x axis that compares methods of different
        cost), ``time`` (Unix time of the record) and ``values``."""
        if not values or not self._is_rank_zero:
            return
        if self._log_peak_memory:
            if self._device.type == "cuda":
                values["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            else:
                values["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        self._metric_logger.log_dict(values, step=self.global_step)
        record = {"step": self.global_step, "tokens": self.tokens_seen,
                  "train_seconds": round(self.train_seconds, 3), "time": round(time.time(), 3),
                  **values}
        if self._metrics_file is None:  # opened once, appended to; a line is flushed at once
            self._metrics_file = open(self._output_dir / "metrics.jsonl", "a", buffering=1)
        self._metrics_file.write(json.dumps(record) + "\n")

    def cleanup(self) -> None:
        if self._run_lock is not None:
            self._run_lock.close()
        if self._profiler is not None:
            self._profiler.stop()
        if self._metrics_file is not None:
            self._metrics_file.close()
        if self._metric_logger is not None:
            self._metric_logger.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _record_step(line: str) -> int:
    """The ``step`` of one ``metrics.jsonl`` line; a line a kill cut short counts as after every
    step (it is dropped)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return sys.maxsize


def run(cfg: DictConfig) -> None:
    """``tune run tad_distill`` on a parsed config, in this process: check it, resolve its
    ``pkg://`` paths, set up, train, export."""
    validate_config(cfg)
    resolve_package_paths(cfg)
    recipe = TADDistillRecipe(cfg)
    try:
        recipe.setup(cfg)
        try:
            recipe.train()
        except Stopped as stopped:
            if recipe._is_rank_zero:
                print(f"tad_distill: SIGTERM: stopped after step {stopped.step}, its state saved "
                      f"in {stopped.checkpoint}; resume_from_checkpoint=true continues from it",
                      file=sys.stderr)
            raise SystemExit(Stopped.EXIT) from None
        if recipe._is_rank_zero:
            print(f"tad_distill: done; outputs in {recipe._output_dir} (student: "
                  f"{recipe._output_dir / 'student'}, metrics: "
                  f"{recipe._output_dir / 'metrics.jsonl'})")
    finally:
        recipe.cleanup()


@reports_user_errors("tad_distill")
@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point of ``tune run tad_distill --config ...``."""
    run(cfg)


if __name__ == "__main__":
    sys.argv = resolve_config_argv(sys.argv)
    sys.exit(recipe_main())
