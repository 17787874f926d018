"""Distributed set-up and the one place where activation checkpointing, compile and FSDP2 are
applied to a model."""

import contextlib
import functools
import os
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard, register_fsdp_forward_method
from torch.utils.checkpoint import checkpoint


def launched_processes() -> int:
    """How many processes torchrun launched (``WORLD_SIZE``); 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def preemption_grace_s() -> int | None:
    """Seconds torchrun's agent waits, after passing a SIGTERM on to the processes, before it
    kills them: ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` where this torch reads it (2.13; torchrun's
    ``--shutdown-timeout`` sets it for the agent alone, unseen here), else 30. None without
    torchrun."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    if not shutdown_timeout_settable():
        return 30
    return int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30"))


def shutdown_timeout_settable() -> bool:
    """Whether torchrun's agent takes its shutdown timeout from its environment (torch 2.13;
    2.11's is 30 s, fixed)."""
    from torch.distributed.launcher.api import LaunchConfig

    return "shutdown_timeout" in getattr(LaunchConfig, "__dataclass_fields__", {})


def init_distributed(device_type: str, cpu_offload: bool = False) -> tuple[int, int]:
    """Initialise the default process group when launched by torchrun; returns (rank, world).

    CUDA uses NCCL, CPU uses gloo (so the distributed path runs, and is tested, without a GPU).
    With ``cpu_offload`` (FSDP2's ``CPUOffloadPolicy``) on CUDA, gloo serves the CPU tensors
    too: the sharded gradients live on the CPU, and the gradient norm's all-reduce and the
    export's gathers run on them (NCCL alone has no CPU backend), as torchtune's recipes do.
    """
    if launched_processes() > 1 and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda" and cpu_offload:
            backend = "cuda:nccl,cpu:gloo"
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


#: how long a rank waits for the others' work outside collectives (rank 0 reading a checkpoint,
#: writing an export, deleting old checkpoints), far beyond NCCL's 10-minute watchdog, which
#: would otherwise stop a run whose rank 0 writes a 9B student to slow storage
LONG_WAIT = timedelta(hours=2)

_waits: tuple[Any, Any] | None = None  # (the default group, its gloo group timing out at LONG_WAIT)


def waiting_group() -> Any:
    """A gloo group of every rank whose collectives time out after ``LONG_WAIT``, for waiting
    on another rank's file work: it carries no tensors, and on a GPU it runs outside NCCL's
    watchdog. Made on first use (a collective: every rank asks for it at the same point), again
    after the default group is replaced; None without a process group."""
    global _waits
    if not dist.is_initialized():
        return None
    world = dist.group.WORLD
    if _waits is None or _waits[0] is not world:
        _waits = (world, dist.new_group(backend="gloo", timeout=LONG_WAIT))
    return _waits[1]


def barrier() -> None:
    """Every rank waits here for the others, however long their file work takes (up to
    ``LONG_WAIT``); nothing without a process group of several ranks.

    Raises:
        ReportedElsewhere: another rank's process ended meanwhile (it reports why).
        RuntimeError: ``LONG_WAIT`` passed.
    """
    if dist.is_initialized() and dist.get_world_size() > 1:
        group = waiting_group()
        with waiting("the other ranks' file work"):
            dist.barrier(group=group)


#: how gloo says that the process at the other end of a connection has gone
PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe")


@contextlib.contextmanager
def waiting(what: str):
    """Around collectives of ``waiting_group`` (made before, outside this): gloo raises as soon
    as another rank's process has ended (unlike NCCL, which hangs until torchrun stops the
    rank). That process reports its own error, so this one raises ``ReportedElsewhere``; a
    timeout is an error of this wait's own, and anything else propagates as it is."""
    from tad_torchtune.errors import ReportedElsewhere, one_line

    try:
        yield
    except RuntimeError as err:
        text = str(err).lower()
        if "timed out" in text:
            raise RuntimeError(f"waited {LONG_WAIT} for {what}: {one_line(err)}") from err
        if any(gone in text for gone in PEER_GONE):
            raise ReportedElsewhere(f"another rank stopped while this one waited for {what}: "
                                    f"{one_line(err)}", status=1) from err
        raise


T = TypeVar("T")


def on_rank0(fn: Callable[[], T], share: Callable[[T], Any] = lambda _: None
             ) -> tuple[T | None, Any]:
    """Run ``fn`` on rank 0 only (a checkpoint read once, not once per process) and give every
    rank ``share`` of its result (e.g. the checkpoint's vocabulary size).

    An error ``fn`` raises reaches every rank, so none waits for a collective rank 0 never
    joins: rank 0 raises its own (``errors.reports_user_errors`` prints a user's in one line);
    the others raise ``ReportedElsewhere`` with its message, exit status 2 for a user's error,
    1 for any other, and print nothing. Without a process group, ``fn`` runs here.

    Returns:
        ``(result, shared)``: ``result`` is ``None`` on every rank but 0.
    """
    from tad_torchtune.errors import USER_ERROR_EXIT, ReportedElsewhere, user_error_types

    if not dist.is_initialized() or dist.get_world_size() == 1:
        result = fn()
        return result, share(result)
    result, error, payload = None, None, [None]
    if dist.get_rank() == 0:
        try:
            result = fn()
            payload = [(None, share(result))]
        except BaseException as err:  # noqa: B902 (every rank must hear of it)
            error = err
            user = isinstance(err, user_error_types())
            payload = [((user, str(err) if user else f"{type(err).__name__}: {err}"), None)]
    # the other ranks wait as long as rank 0 reads, e.g. a 37 GB checkpoint from slow storage
    group = waiting_group()
    try:
        with waiting("rank 0"):
            dist.broadcast_object_list(payload, src=0, group=group)
    except BaseException:
        if error is not None:
            raise error from None  # rank 0's own comes first, whatever the others did
        raise
    failed, shared = payload[0]
    if error is not None:
        raise error
    if failed is not None:
        user, message = failed
        raise ReportedElsewhere(f"rank 0 failed: {message}", status=USER_ERROR_EXIT if user
                                else 1)
    return result, shared


def require_one_process(prog: str) -> None:
    """Refuse a launch on several processes (``--nproc_per_node``) of a command that runs in
    one: each process would run the whole of it and write the same files.

    Raises:
        ConfigError: naming the launch, the number of processes and what is accepted.
    """
    from tad_torchtune.errors import ConfigError

    world = launched_processes()
    if world > 1:
        raise ConfigError(f"--nproc_per_node: {prog} runs in one process, got {world} "
                          f"(WORLD_SIZE={world}); run it without --nproc_per_node")


def checkpoint_block(block: nn.Module) -> None:
    """Make ``block`` recompute its activations in backward, in place.

    The block's forward is wrapped rather than the module, so parameter names (and so state
    dicts, distributed checkpoints and exports) are the same with or without checkpointing.
    """
    inner = block.forward
    block.forward = functools.partial(checkpoint, inner, use_reentrant=False)


def parallelize(
    model: nn.Module,
    *,
    activation_checkpointing: bool = False,
    compile: bool = False,
    fsdp: bool = False,
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
    root: nn.Module | None = None,
) -> nn.Module:
    """Apply, in this order, activation checkpointing, per-block ``torch.compile`` and FSDP2.

    The order matters: checkpointing wraps each block first so that compile traces the block
    together with its recomputation; compile is per block (every block has the same structure, so
    one graph is reused, and FSDP's hooks stay outside the compiled region); ``fully_shard`` is
    applied to each block and then to ``root``, so each block's parameters are gathered just
    before it runs and freed after (``reshard_after_forward``), and the root group holds the
    embeddings, final norm and output projection (tied weights stay one parameter).

    Args:
        model: a torchtune ``TransformerDecoder`` (``model.layers`` is its list of blocks).
        activation_checkpointing: recompute block activations in backward (student only).
        compile: ``torch.compile`` each block.
        fsdp: shard with ``fully_shard`` over the default process group.
        cpu_offload: keep sharded parameters (and gradients, optimizer state) on the CPU.
        reshard_after_forward: free gathered parameters after each block's forward.
        root: the module sharded last, as the FSDP root (its parameters outside the blocks are
            gathered for its whole forward): the model itself, or a wrapper that also computes
            the losses from the output weight; its ``fsdp_forward_methods`` are registered with
            FSDP like ``forward``. ``None`` leaves those parameters replicated (the
            frozen teacher: its embeddings and output are then read directly by the losses).

    Returns:
        The same model, modified in place.
    """
    for block in model.layers:
        if activation_checkpointing:
            checkpoint_block(block)
        if compile:
            block.compile()
    if fsdp:
        kwargs = {"reshard_after_forward": reshard_after_forward}
        if cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for block in model.layers:
            fully_shard(block, **kwargs)
        if root is not None:
            fully_shard(root, **kwargs)
            # methods other than forward that read the root's parameters (StudentHead.evaluate)
            for name in getattr(root, "fsdp_forward_methods", ()):
                register_fsdp_forward_method(root, name)
    return model
