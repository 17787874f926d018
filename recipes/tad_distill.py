"""Full-parameter knowledge distillation of a torchtune decoder into a smaller one.

    tune run tad_distill --config demo
    tune run --nproc_per_node 2 tad_distill --config path/to/config.yaml key=value ...

The objective of one optimizer step is

    (clm_weight * CE + kd_weight * kd_loss + hidden_weight * hidden_loss) summed over the valid
    tokens of every micro-batch on every process, divided by their global count,

so (batch 8, accumulation 1), (batch 2, accumulation 4) and (batch 4 on 2 processes) give the same
update (DESIGN.md §1, Reduction). ``kd_loss`` is any divergence of ``tad_torchtune.losses``
(TAD, forward KL, reverse KL, DRKL): swapping one for another is one YAML line or
``kd_loss._component_=tad_torchtune.losses.ForwardKLLoss`` on the command line.

Single process, or FSDP2 under torchrun (NCCL on CUDA, gloo on CPU). Training state is saved
with ``torch.distributed.checkpoint`` atomically every ``save_every_n_steps``; with
``resume_from_checkpoint: true`` a run continues from its newest complete checkpoint, on the same
or another number of processes, and logs the same losses it would have logged uninterrupted.
"""

import json
import math
import resource
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchtune import config, training
from torchtune.data import padded_collate_packed, padded_collate_sft
from tqdm import tqdm

from tad_torchtune.checkpointing import TrainingCheckpointer, rng_state, set_rng_state
from tad_torchtune.config_checks import (
    SCALARS,
    resolve_config_argv,
    resolve_package_paths,
    validate_config,
)
from tad_torchtune.data import ResumableBatchSampler
from tad_torchtune.losses import DivergenceOutput, ForwardKLLoss
from tad_torchtune.losses.ce import chunked_cross_entropy, linear_cross_entropy
from tad_torchtune.models import (
    check_vocab_compat,
    correct_gemma2,
    forward_hidden,
    init_student_from_teacher,
    logit_softcap,
    output_weight,
    project_logits,
    save_hf_checkpoint,
)
from tad_torchtune.parallel import full_tensor, init_distributed, parallelize

IGNORE_INDEX = -100


class NonFiniteError(RuntimeError):
    """A loss or gradient norm that is not finite: the optimizer step was not taken."""


class StudentStep(nn.Module):
    """Runs the student AND its losses in one ``forward``.

    Under FSDP2 this module is the root of the student's sharding, so its output projection is
    gathered while the losses read it (the fused path needs the weight, not the logits).
    """

    def __init__(self, student: nn.Module, loss_fn: Any) -> None:
        super().__init__()
        self.student = student
        object.__setattr__(self, "_loss_fn", loss_fn)  # not a submodule

    def forward(self, batch: dict[str, Tensor], teacher_out: dict[str, Any], evaluate: bool):
        return self._loss_fn(self.student, batch, teacher_out, evaluate)


class TADDistillRecipe:
    """Distils ``teacher_model`` into ``student_model``; see the module docstring.

    Args:
        cfg: the validated config (``tad_torchtune.config_checks.validate_config``).
    """

    def __init__(self, cfg: DictConfig) -> None:
        def get(key: str) -> Any:
            return cfg.get(key, SCALARS[key][1])

        self._device = torch.device(get("device"))
        self._dtype = torch.bfloat16 if get("dtype") == "bf16" else torch.float32
        self._rank, self._world_size = init_distributed(self._device.type)
        self._is_rank_zero = self._rank == 0
        if self._device.type == "cuda":
            self._device = torch.device("cuda", torch.cuda.current_device())
        self._output_dir = Path(cfg.output_dir)
        self._seed = training.set_seed(get("seed"))

        self._clm_weight = float(get("clm_weight"))
        self._kd_weight = float(get("kd_weight"))
        self._hidden_weight = float(get("hidden_weight"))
        pairs = get("hidden_layers") or ([[-1, -1]] if self._hidden_weight > 0 else [])
        self._student_hidden_layers = tuple(int(p[0]) for p in pairs)
        self._teacher_hidden_layers = tuple(int(p[1]) for p in pairs)
        self._fused = bool(get("fused"))
        self._teacher_cache_mib = float(get("fused_teacher_cache_mib"))
        self._float32_weight_grad = bool(get("fused_float32_weight_grad"))
        self._loss_chunk_size = int(get("loss_chunk_size"))
        self._vocab_alignment = get("vocab_alignment")

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

        self.global_step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.tokens_seen = 0

    # ------------------------------------------------------------------------------------ setup

    def setup(self, cfg: DictConfig) -> None:
        """Build everything in dependency order: logging first (so set-up is visible), then the
        teacher (the student is initialised from its weights), the vocabulary checks (before any
        compute is spent), parallelism (after weights are loaded, so sharding splits real
        tensors), losses, optimizer (over the sharded trainable parameters), data, and last the
        resume, which overwrites model, optimizer, scheduler and data position."""
        self._metric_logger = None
        self._metrics_file = None
        if self._is_rank_zero:
            self._output_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg, self._output_dir / "config.yaml")
            logger_cfg = cfg.get("metric_logger") or OmegaConf.create({
                "_component_": "torchtune.training.metric_logging.DiskLogger",
                "log_dir": str(self._output_dir / "logs"),
            })
            self._metric_logger = config.instantiate(logger_cfg)
            self._metric_logger.log_config(cfg)

        self._tokenizer = config.instantiate(cfg.tokenizer)
        teacher_tokenizer = (config.instantiate(cfg.teacher_tokenizer)
                             if cfg.get("teacher_tokenizer") is not None else None)

        self._teacher = self._setup_teacher(cfg)
        self._student, self._hf_source_dir, self._hf_model_type = self._setup_student(cfg)
        self._hf_base_config = json.loads((self._hf_source_dir / "config.json").read_text())
        check_vocab_compat(
            teacher_vocab_size=output_weight(self._teacher).shape[0],
            student_vocab_size=output_weight(self._student).shape[0],
            vocab_alignment=self._vocab_alignment,
            teacher_tokenizer=teacher_tokenizer,
            student_tokenizer=self._tokenizer if teacher_tokenizer is not None else None,
        )
        self._teacher_softcap = logit_softcap(self._teacher)
        self._student_softcap = logit_softcap(self._student)

        fsdp = self._world_size > 1
        self._step_module = StudentStep(self._student, self._student_losses)
        parallelize(self._teacher, compile=self._compile, fsdp=fsdp, cpu_offload=self._cpu_offload)
        parallelize(self._student, activation_checkpointing=self._activation_checkpointing,
                    compile=self._compile, fsdp=fsdp, cpu_offload=self._cpu_offload,
                    root=self._step_module)

        self._kd_loss = config.instantiate(cfg.kd_loss) if self._kd_weight > 0 else None
        self._kd_sum_and_count = None
        if self._kd_loss is not None:
            self._kd_loss.vocab_alignment = self._vocab_alignment
            # The unfused divergence is compiled whole (chunk loop and recomputation included);
            # the fused path is an autograd.Function of its own.
            self._kd_sum_and_count = (torch.compile(self._kd_loss.sum_and_count)
                                      if self._compile else self._kd_loss.sum_and_count)
        self._hidden_loss = (config.instantiate(cfg.hidden_loss)
                             if self._hidden_weight > 0 else None)
        self._eval_kl = ForwardKLLoss(chunk_size=self._loss_chunk_size,
                                      vocab_alignment=self._vocab_alignment)

        trainable = [p for p in self._step_module.parameters() if p.requires_grad]
        self._optimizer = config.instantiate(cfg.optimizer, trainable)
        self._train_loader, self._train_sampler = self._setup_data(cfg.dataset, train=True)
        self._val_loader = None
        if cfg.get("validation_dataset") is not None:
            self._val_loader, _ = self._setup_data(cfg.validation_dataset, train=False)
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
        self._lr_scheduler = None
        if cfg.get("lr_scheduler") is not None:
            self._lr_scheduler = config.instantiate(
                cfg.lr_scheduler, self._optimizer, num_training_steps=self._total_steps
            )

        self._checkpointer = TrainingCheckpointer(
            self._output_dir / "checkpoints", rank=self._rank, keep_last=self._keep_last
        )
        if self._resume:
            self._load_training_state()

    def _setup_teacher(self, cfg: DictConfig) -> nn.Module:
        checkpointer = config.instantiate(cfg.teacher_checkpointer)
        state_dict = checkpointer.load_checkpoint()[training.MODEL_KEY]
        with training.set_default_dtype(self._dtype):
            teacher = config.instantiate(cfg.teacher_model)
        teacher.load_state_dict(state_dict)
        correct_gemma2(teacher)
        teacher.to(self._device).eval()
        teacher.requires_grad_(False)
        return teacher

    def _setup_student(self, cfg: DictConfig) -> tuple[nn.Module, Path, str]:
        """The student, initialised from the teacher (pruned students) or from its own
        checkpoint; returns it with the Hugging Face checkpoint folder (config.json, tokenizer
        files) and model type its export derives from."""
        # The same seed on every rank: FSDP shards each rank's local copy, so fresh weights must
        # be identical everywhere (torchtune's set_seed gives each rank seed + rank).
        torch.manual_seed(self._seed)
        with training.set_default_dtype(self._dtype):
            student = config.instantiate(cfg.student_model)
        source = cfg.teacher_checkpointer
        if getattr(student, "distill_spec", None) is not None:
            init_student_from_teacher(student, self._teacher)
        elif cfg.get("student_checkpointer") is not None:
            checkpointer = config.instantiate(cfg.student_checkpointer)
            student.load_state_dict(checkpointer.load_checkpoint()[training.MODEL_KEY])
            source = cfg.student_checkpointer
        correct_gemma2(student)
        student.to(self._device).train()
        return student, Path(source.checkpoint_dir), str(source.model_type)

    def _setup_data(self, dataset_cfg: DictConfig, *, train: bool):
        packed = bool(dataset_cfg.get("packed", False))
        if packed and self._is_rank_zero and getattr(self._kd_loss, "needs_teacher_pass", False):
            print("tad_distill: warning: packed: true with a row-normalised divergence (TAD): its "
                  "abar is the mean tail mass over each packed row, not over each document",
                  file=sys.stderr)
        dataset = config.instantiate(dataset_cfg, self._tokenizer)
        if train:
            sampler = ResumableBatchSampler(
                len(dataset), batch_size=self._batch_size, rank=self._rank,
                world_size=self._world_size, shuffle=self._shuffle, seed=self._seed,
            )
        else:
            # Every held-out sample exactly once over all ranks, whatever their number.
            own = list(range(self._rank, len(dataset), self._world_size))
            sampler = [own[i : i + self._batch_size] for i in range(0, len(own), self._batch_size)]
        collate = (padded_collate_packed if packed else
                   partial(padded_collate_sft, padding_idx=self._tokenizer.pad_id
                           if getattr(self._tokenizer, "pad_id", None) is not None else 0,
                           ignore_idx=IGNORE_INDEX))
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=0)
        return loader, sampler

    # ------------------------------------------------------------------------------- the losses

    def _teacher_forward(self, batch: dict[str, Tensor], need_logits: bool) -> dict[str, Any]:
        with torch.no_grad():
            h, hidden = forward_hidden(
                self._teacher, batch["tokens"], mask=batch.get("mask"),
                input_pos=batch.get("input_pos"), hidden_layers=self._teacher_hidden_layers,
            )
            out: dict[str, Any] = {"hidden": hidden, "h": h}
            if need_logits:
                out["logits"] = project_logits(self._teacher, h)
        return out

    def _student_losses(self, student: nn.Module, batch: dict[str, Tensor],
                        teacher_out: dict[str, Any], evaluate: bool) -> dict[str, Any]:
        """Un-normalised loss sums of one micro-batch (called inside ``StudentStep.forward``)."""
        labels = batch["labels"]
        h, hidden = forward_hidden(
            student, batch["tokens"], mask=batch.get("mask"), input_pos=batch.get("input_pos"),
            hidden_layers=() if evaluate else self._student_hidden_layers,
        )
        if evaluate:
            logits = project_logits(student, h)
            ce, n = chunked_cross_entropy(logits, labels, chunk_size=self._loss_chunk_size)
            kl = self._eval_kl.sum_and_count(logits, teacher_out["logits"], labels)
            top1 = (logits.argmax(-1) == teacher_out["logits"][..., : logits.shape[-1]].argmax(-1))
            agree = (top1 & (labels != IGNORE_INDEX)).sum()
            return {"ce": ce, "kl": kl.total, "agree": agree, "tokens": n}

        terms: dict[str, Any] = {}
        weight = full_tensor(output_weight(student))
        if self._fused:
            from tad_torchtune.losses.fused import fused_divergence

            ce, n = linear_cross_entropy(h, weight, labels, softcap=self._student_softcap,
                                         chunk_size=self._loss_chunk_size)
            if self._kd_loss is not None:
                terms["kd"] = fused_divergence(
                    self._kd_loss, h, weight, teacher_out["h"],
                    full_tensor(output_weight(self._teacher)), labels,
                    student_softcap=self._student_softcap, teacher_softcap=self._teacher_softcap,
                    chunk_size=self._loss_chunk_size, teacher_cache_mib=self._teacher_cache_mib,
                    compile_chunks=self._compile, float32_weight_grad=self._float32_weight_grad,
                )
        else:
            logits = project_logits(student, h)  # (B, T, V) in the model dtype
            ce, n = chunked_cross_entropy(logits, labels, chunk_size=self._loss_chunk_size)
            if self._kd_loss is not None:
                terms["kd"] = self._kd_sum_and_count(logits, teacher_out["logits"], labels)
        terms["ce"] = ce
        terms["tokens"] = n
        if self._hidden_loss is not None:
            hidden_sum = sum(
                self._hidden_loss.sum_and_count(s_h, t_h, labels).total
                for s_h, t_h in zip(hidden, teacher_out["hidden"])
            )
            terms["hidden"] = hidden_sum
        return terms

    @staticmethod
    def _shift_labels(batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Position t predicts token t+1: labels move left, the last position is ignored."""
        labels = batch["labels"]
        ignore = torch.full_like(labels[:, :1], IGNORE_INDEX)
        return {**batch, "labels": torch.cat([labels[:, 1:], ignore], dim=1)}

    def _all_reduce(self, values: Tensor) -> Tensor:
        if self._world_size > 1:
            dist.all_reduce(values)
        return values

    # --------------------------------------------------------------------------------- training

    def train(self) -> None:
        """Optimizer steps until ``epochs`` / ``max_steps``, with logging, validation and
        checkpoints; a non-finite loss or gradient norm raises ``NonFiniteError`` before the
        optimizer touches the weights."""
        self._optimizer.zero_grad(set_to_none=True)
        progress = tqdm(total=self._total_steps, initial=self.global_step,
                        disable=not self._is_rank_zero, desc="tad_distill", dynamic_ncols=True)
        while self.epoch < self._epochs and self.global_step < self._total_steps:
            self._train_sampler.set_position(
                self.epoch, self.step_in_epoch * self._grad_accum * self._train_sampler.global_batch
            )
            batches = iter(self._train_loader)
            while self.step_in_epoch < self._steps_per_epoch and self.global_step < self._total_steps:
                t0 = time.perf_counter()
                micro = [self._to_device(self._shift_labels(next(batches)))
                         for _ in range(self._grad_accum)]
                log = self._train_step(micro)
                self.global_step += 1
                self.step_in_epoch += 1
                self.tokens_seen += int(log["step_tokens"])
                log["tokens_per_second"] = log["step_tokens"] / (time.perf_counter() - t0)
                progress.update(1)
                progress.set_postfix(loss=f"{log['loss']:.4f}", lr=f"{log['lr']:.2e}")
                if self.global_step % self._log_every == 0 or self.global_step == self._total_steps:
                    self._log(log)
                if self._eval_every and self.global_step % self._eval_every == 0:
                    self._log(self.evaluate())
                if self._save_every and self.global_step % self._save_every == 0:
                    self.save()
            if self.step_in_epoch >= self._steps_per_epoch:
                self.epoch += 1
                self.step_in_epoch = 0
        progress.close()
        if self._val_loader is not None and not (
            self._eval_every and self.global_step % self._eval_every == 0
        ):
            self._log(self.evaluate())
        if not (self._save_every and self.global_step % self._save_every == 0):
            self.save(export=False)  # the final export follows
        self.export(self._output_dir / "student")

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self._device) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def _train_step(self, micro: list[dict[str, Tensor]]) -> dict[str, float]:
        local_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro)
        global_tokens = int(self._all_reduce(torch.tensor([local_tokens], dtype=torch.float64,
                                                          device=self._device))[0])
        # FSDP averages gradients over ranks; scaling by world_size turns that into a sum, so the
        # update is (global sum of token losses) / (global token count).
        scale = self._world_size / max(global_tokens, 1)
        sums = {"ce": 0.0, "kd": 0.0, "hidden": 0.0}
        stats: dict[str, float] = {}
        for batch in micro:
            teacher_out = self._teacher_forward(batch, need_logits=not self._fused)
            terms = self._step_module(batch, teacher_out, False)
            kd: DivergenceOutput | None = terms.get("kd")
            loss = self._clm_weight * terms["ce"]
            if kd is not None:
                loss = loss + self._kd_weight * kd.total
                for name, value in kd.stats.items():
                    stats[name] = stats.get(name, 0.0) + float(value)
            if "hidden" in terms:
                loss = loss + self._hidden_weight * terms["hidden"]
            (loss * scale).backward()
            sums["ce"] += float(terms["ce"].detach())
            sums["kd"] += float(kd.total.detach()) if kd is not None else 0.0
            sums["hidden"] += float(terms["hidden"].detach()) if "hidden" in terms else 0.0
        names = sorted(stats)
        packed = torch.tensor([sums["ce"], sums["kd"], sums["hidden"], *(stats[k] for k in names)],
                              dtype=torch.float64, device=self._device)
        packed = self._all_reduce(packed) / max(global_tokens, 1)
        ce, kd_mean, hidden_mean = (float(x) for x in packed[:3])
        loss_value = (self._clm_weight * ce + self._kd_weight * kd_mean
                      + self._hidden_weight * hidden_mean)

        max_norm = self._clip_grad_norm if self._clip_grad_norm is not None else float("inf")
        grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(
            [p for p in self._step_module.parameters() if p.requires_grad], max_norm)))
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            self._optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(
                f"step {self.global_step + 1}: loss {loss_value} / gradient norm {grad_norm} is "
                f"not finite; the optimizer step was not taken and the last checkpoint "
                f"({self._checkpointer.latest()}) is intact"
            )
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        lr = self._optimizer.param_groups[0]["lr"]
        if self._lr_scheduler is not None:
            self._lr_scheduler.step()
        log = {"loss": loss_value, "ce": ce, "lr": lr, "grad_norm": grad_norm,
               "step_tokens": float(global_tokens)}
        if self._kd_loss is not None:
            log["kd_loss"] = kd_mean
            log.update({f"kd/{k}": float(v) for k, v in zip(names, packed[3:])})
        if self._hidden_loss is not None:
            log["hidden_loss"] = hidden_mean
        return log

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out KL(teacher || student), student cross-entropy and perplexity, top-1 agreement,
        over the whole validation set (or ``max_eval_batches`` per rank)."""
        if self._val_loader is None:
            return {}
        self._student.eval()
        totals = torch.zeros(4, dtype=torch.float64, device=self._device)
        for i, batch in enumerate(self._val_loader):
            if self._max_eval_batches is not None and i >= self._max_eval_batches:
                break
            batch = self._to_device(self._shift_labels(batch))
            out = self._step_module(batch, self._teacher_forward(batch, need_logits=True), True)
            totals += torch.stack([out["kl"].double(), out["ce"].double(),
                                   out["agree"].double(), out["tokens"].double()])
        self._student.train()
        kl, ce, agree, n = self._all_reduce(totals).tolist()
        n = max(n, 1.0)
        return {"val_kl": kl / n, "val_ce": ce / n, "val_ppl": math.exp(min(ce / n, 700.0)),
                "val_top1_agreement": agree / n}

    # ------------------------------------------------------------------ checkpoints and logging

    def save(self, export: bool = True) -> None:
        """Training state (DCP, atomic) and, if ``export_hf``, the student as an HF checkpoint."""
        meta = {
            "global_step": self.global_step, "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch, "tokens_seen": self.tokens_seen,
            "samples_in_epoch": self.step_in_epoch * self._grad_accum * self._train_sampler.global_batch,
            "lr_scheduler": self._lr_scheduler.state_dict() if self._lr_scheduler else None,
            "rng": rng_state(), "world_size": self._world_size,
        }
        path = self._checkpointer.save(self.global_step, self._step_module, self._optimizer, meta)
        if export and self._export_hf:
            self.export(path / "hf")

    def export(self, out_dir: Path) -> None:
        """The student as a Hugging Face checkpoint (safetensors + its own config.json)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            self._step_module.student,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )
        if self._is_rank_zero:
            save_hf_checkpoint(
                self._student, out_dir, base_config=self._hf_base_config,
                model_type=self._hf_model_type, state_dict=state,
                copy_files_from=self._hf_source_dir,
            )
        if self._world_size > 1:
            dist.barrier()

    def _load_training_state(self) -> None:
        path = self._checkpointer.latest()
        if path is None:
            if self._is_rank_zero:
                print(f"resume_from_checkpoint: no checkpoint in {self._checkpointer.root}; "
                      "starting from scratch", file=sys.stderr)
            return
        meta = self._checkpointer.load(path, self._step_module, self._optimizer)
        self.global_step, self.epoch = meta["global_step"], meta["epoch"]
        self.tokens_seen = meta["tokens_seen"]
        per_step = self._grad_accum * self._train_sampler.global_batch
        if meta["samples_in_epoch"] % per_step:
            raise ValueError(
                f"resume_from_checkpoint: the checkpoint stopped after {meta['samples_in_epoch']} "
                f"samples of epoch {self.epoch}, not a multiple of this run's "
                f"{per_step} samples per optimizer step (batch_size x gradient_accumulation_steps "
                "x processes)"
            )
        self.step_in_epoch = meta["samples_in_epoch"] // per_step
        if self._lr_scheduler is not None and meta["lr_scheduler"] is not None:
            self._lr_scheduler.load_state_dict(meta["lr_scheduler"])
        set_rng_state(meta["rng"])
        if self._is_rank_zero:
            print(f"resumed from {path} at step {self.global_step}", file=sys.stderr)

    def _log(self, values: dict[str, float]) -> None:
        if not values or not self._is_rank_zero:
            return
        if self._log_peak_memory:
            if self._device.type == "cuda":
                values["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            else:
                values["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        self._metric_logger.log_dict(values, step=self.global_step)
        record = {"step": self.global_step, "tokens": self.tokens_seen, **values}
        with open(self._output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def cleanup(self) -> None:
        if self._metric_logger is not None:
            self._metric_logger.close()
        if dist.is_initialized():
            dist.destroy_process_group()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point of ``tune run tad_distill --config ...``."""
    validate_config(cfg)
    resolve_package_paths(cfg)
    recipe = TADDistillRecipe(cfg)
    try:
        recipe.setup(cfg)
        recipe.train()
        if recipe._is_rank_zero:
            print(f"tad_distill: done; outputs in {recipe._output_dir} (student: "
                  f"{recipe._output_dir / 'student'}, metrics: "
                  f"{recipe._output_dir / 'metrics.jsonl'})")
    finally:
        recipe.cleanup()


if __name__ == "__main__":
    sys.argv = resolve_config_argv(sys.argv)
    sys.exit(recipe_main())
