"""Atomic, resharding-friendly training checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout under ``<output_dir>/checkpoints``::

    step_000040/        DCP shards of {"model", "optim"} + meta.pt (step, data position, RNG, ...)
    latest              text file naming the newest COMPLETE checkpoint folder

A checkpoint is written into a hidden temporary folder, which is renamed into place only when
every rank has finished, and ``latest`` is then replaced atomically (``tad_torchtune.files``). A process
killed at any moment therefore leaves ``latest`` pointing at a complete checkpoint. DCP stores
tensors by name with their global shapes, so a checkpoint taken on N processes loads on M.
"""

import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from tad_torchtune.files import atomic_write_text, publish_dir
from tad_torchtune.parallel import barrier, waiting, waiting_group

LATEST = "latest"
META = "meta.pt"


@contextmanager
def _one_process_quietly():
    """Without a process group, torch's distributed checkpoint warns at every save and load
    that it assumes one process: that is every one-process run; the warning says nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or "
                                "uninitialized, assuming the intent is to (save|load) in a single "
                                "process")
        yield


class TrainingCheckpointer:
    """Saves and restores model, optimizer and recipe state.

    Args:
        root: folder holding the checkpoints.
        rank: this process's rank (rank 0 renames folders and writes ``latest``).
        keep_last: number of complete checkpoints kept; older ones are deleted.
    """

    def __init__(self, root: str | Path, *, rank: int = 0, keep_last: int = 2) -> None:
        self.root = Path(root)
        self.rank = rank
        self.keep_last = keep_last

    def latest(self) -> Path | None:
        """The newest complete checkpoint folder, or None."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / META).is_file() else None

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             meta: dict[str, Any]) -> Path:
        """Write a checkpoint of ``step`` (all ranks call this)."""
        final = self.root / f"step_{step:06d}"
        tmp = self.root / f".step_{step:06d}.incomplete"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        state = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer),
        }
        # its plans exchanged on the waiting group: no rank's slower writes can time the others
        # out (NCCL's 10-minute watchdog)
        group = waiting_group()
        with _one_process_quietly(), waiting("the other ranks' checkpoint writes"):
            dcp.save(state, checkpoint_id=str(tmp), process_group=group)
        if self.rank == 0:
            torch.save(meta, tmp / META)
        barrier()
        if self.rank == 0:
            publish_dir(tmp, final, replace=True)
            atomic_write_text(self.root / LATEST, final.name)
            self._prune(keep=final)
        barrier()
        return final

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore model and optimizer in place from ``path``; returns the recipe ``meta``."""
        state = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer),
        }
        group = waiting_group()
        with _one_process_quietly(), waiting("the other ranks' checkpoint reads"):
            dcp.load(state, checkpoint_id=str(path), process_group=group)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
        return torch.load(path / META, weights_only=False)

    def _prune(self, keep: Path) -> None:
        done = sorted(p for p in self.root.glob("step_*") if (p / META).is_file())
        for old in done[: max(0, len(done) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """The CPU generator's state and, where this process has used CUDA, its own device's (not
    every visible GPU's: ``get_rng_state_all`` would create a context on each, and a resume
    that sees fewer GPUs could not put them back)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what ``rng_state`` saved: the CUDA state on this process's current device (of a
    checkpoint holding one per visible GPU, that device's, where it has one)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    device = torch.cuda.current_device()
    if isinstance(cuda, (list, tuple)):  # one state per visible GPU (checkpoints before)
        if device >= len(cuda):
            return
        cuda = cuda[device]
    torch.cuda.set_rng_state(cuda, device)
