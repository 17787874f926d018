"""Atomic, resharding-friendly training checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout under ``<output_dir>/checkpoints``::

    step_000040/        DCP shards of {"model", "optim"} + meta.pt (step, data position, RNG, ...)
    latest              text file naming the newest COMPLETE checkpoint folder

A checkpoint is written into a hidden temporary folder, which is renamed into place only when
every rank has finished, and ``latest`` is then replaced atomically (``tad_torchtune.files``). A process
killed at any moment therefore leaves ``latest`` pointing at a complete checkpoint, but for the
instant in which a rewritten one is renamed in; a folder damaged afterwards (a file deleted or
cut short) is found before it is loaded. Either way the resume takes the newest checkpoint that
loads (``TrainingCheckpointer.newest``). DCP stores tensors by name with their global shapes, so
a checkpoint taken on N processes loads on M.
"""

import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from tad_torchtune.errors import ConfigError
from tad_torchtune.files import atomic_write_text, publish_dir, remove_stale
from tad_torchtune.parallel import barrier, waiting, waiting_group

LATEST = "latest"
META = "meta.pt"
#: DCP's file of the tensors' names, global shapes and places in the shard files
DCP_METADATA = ".metadata"
STEP = re.compile(r"step_(\d+)")


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
        """The newest checkpoint folder that loads (``newest``), or None."""
        return self.newest()[0]

    def newest(self) -> tuple[Path | None, list[str]]:
        """The checkpoint a resume loads: the one ``latest`` names, or where that one is
        missing or damaged (``checkpoint_damage``), or ``latest`` itself is, the newest by step
        number that loads; with one line for each passed over, saying why (``docs/design.md``,
        "One step").

        Returns:
            ``(folder, lines)``; ``folder`` is None when no complete checkpoint exists (the run
            starts from scratch).

        Raises:
            ConfigError: complete checkpoints exist, but every one is damaged.
        """
        pointer = self.root / LATEST
        named = pointer.read_text().strip() if pointer.is_file() else ""
        steps = {p: int(m[1]) for p in self.root.glob("step_*")
                 if (m := STEP.fullmatch(p.name)) and p.is_dir()}
        skipped = []
        if named and not (self.root / named).is_dir():
            skipped.append(f"resume_from_checkpoint: skipped {str(self.root / named)!r}: "
                           f"{LATEST} names it, but it does not exist")
        elif not named and steps:
            skipped.append(f"resume_from_checkpoint: {str(pointer)!r} is "
                           f"{'empty' if pointer.is_file() else 'missing'}: the newest "
                           f"checkpoint by step number is taken")
        damaged = []
        # the one latest names first, then the newest by step
        for path in sorted(steps, key=lambda p: (p.name != named, -steps[p])):
            why = checkpoint_damage(path)
            if why is None:
                return path, skipped
            skipped.append(f"resume_from_checkpoint: skipped {str(path)!r}: {why}")
            if (path / META).is_file():
                damaged.append(f"{path.name}: {why}")
        if damaged:
            more = f"; and {len(damaged) - 1} more" if len(damaged) > 1 else ""
            raise ConfigError(
                f"resume_from_checkpoint: no checkpoint in {str(self.root)!r} can be loaded "
                f"({damaged[0]}{more}); delete {str(self.root)!r} to start over, or choose "
                f"another output_dir")
        return None, skipped

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             meta: dict[str, Any]) -> Path:
        """Write a checkpoint of ``step`` (all ranks call this)."""
        final = self.root / f"step_{step:06d}"
        tmp = self.root / f".step_{step:06d}.incomplete"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            # a killed save's folder, of this step or another (this run holds output_dir)
            for unfinished in self.root.glob(".step_*.incomplete"):
                shutil.rmtree(unfinished, ignore_errors=True)
            remove_stale(self.root, "step_*")  # a replaced one a kill left aside (publish_dir)
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
        """Restore model and optimizer in place from ``path``; returns the recipe ``meta``.

        Raises:
            ConfigError: the model or the optimizer is not the checkpoint's (``check_fits``).
        """
        state = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer),
        }
        check_fits(path, state, FileSystemReader(str(path)).read_metadata())
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


def checkpoint_damage(path: Path) -> str | None:
    """What keeps the checkpoint folder ``path`` from loading, naming the file, or None when
    nothing does: ``meta.pt`` missing (an unfinished or half-deleted folder) or not loading,
    DCP's metadata not loading, or a shard file it names missing or shorter than the bytes it
    places there. Reads no tensor: cheap beside ``dcp.load``, which would stop on any of these
    with a traceback."""
    if not (path / META).is_file():
        return f"it has no {META} (unfinished or partly deleted)"
    try:
        torch.load(path / META, weights_only=False)
    except Exception as e:  # noqa: B902 (whatever a damaged pickle raises)
        return f"its {META} does not load ({type(e).__name__})"
    if not (path / DCP_METADATA).is_file():
        return f"its {DCP_METADATA} is missing"
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: B902
        return f"its {DCP_METADATA} does not load ({type(e).__name__})"
    need: dict[str, int] = {}  # file -> the end of its last item
    for item in metadata.storage_data.values():
        need[item.relative_path] = max(need.get(item.relative_path, 0), item.offset + item.length)
    for name, size in sorted(need.items()):
        if not (path / name).is_file():
            return f"its {name} is missing"
        if (have := (path / name).stat().st_size) < size:
            return f"its {name} has {have} bytes, its tensors need {size} (truncated)"
    return None


def check_fits(path: Path, state: dict[str, Any], metadata: Metadata) -> None:
    """Refuse to load into ``state`` ({"model": ..., "optim": ...}) a checkpoint of another
    student or optimizer, before ``dcp.load`` stops on the first mismatch with a traceback
    (or, for a key the checkpoint has and the model not, loads without a word): every key
    and tensor's global shape of each part against the checkpoint's ``metadata``.

    Raises:
        ConfigError: naming the part's config key, the first difference and the count of the
            others.
    """
    saved = metadata.state_dict_metadata
    ours, _ = flatten_state_dict(state)  # the keys dcp.load looks up

    def shape(value: Any) -> str:  # a tensor's global shape (DCP's metadata: its size)
        size = value.shape if torch.is_tensor(value) else getattr(value, "size", None)
        return "not a tensor" if size is None else str(list(size))

    for part, key in (("model", "student_model"), ("optim", "optimizer")):
        diffs = []
        for name, value in ours.items():
            if not name.startswith(f"{part}."):
                continue
            if name not in saved:
                diffs.append(f"{path.name} has no {name}, which this run's {key} has")
            elif shape(saved[name]) != shape(value):
                diffs.append(f"{path.name}'s {name} is {shape(saved[name])}, this run's "
                             f"{shape(value)}")
        diffs += [f"{path.name}'s {name} is not in this run's {key}" for name in saved
                  if name.startswith(f"{part}.") and name not in ours]
        if diffs:
            others = len(diffs) - 1
            more = f" (and {others} other difference{'s' * (others > 1)})" if others else ""
            raise ConfigError(
                f"resume_from_checkpoint: {diffs[0]}{more}: {key} differs from the checkpoint's "
                f"run; resume with its {key}, or start over in another output_dir")


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
