"""The distributed set-up and ``parallelize`` (``parallel.py``) on one process: activation
checkpointing recomputes a block in backward and changes neither its state-dict keys nor its
outputs nor its gradients. (FSDP2 on two processes: ``tests/recipes/test_tad_distill.py`` and
``tests/losses/test_fused.py``; compile: ``tests/recipes/test_tad_distill.py``.)"""

import copy

import pytest
import torch

from tad_torchtune.models import forward_hidden
from tad_torchtune.parallel import checkpoint_block, init_distributed, parallelize
from tests.helpers.teachers import SEQ, VOCAB, build_teacher


def _loss_and_grads(model, tokens):
    h, _ = forward_hidden(model, tokens)
    loss = h.square().mean()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()
                           if p.grad is not None}  # the output projection is not used


def _count_mlp_calls(model) -> list[int]:
    calls = [0]

    def hook(module, args):
        calls[0] += 1

    # a pre-hook: recomputation stops once the saved tensors are back (torch's early stop),
    # possibly inside the MLP, where a forward hook would not fire
    for layer in model.layers:
        layer.mlp.register_forward_pre_hook(hook)
    return calls


def test_checkpoint_block_keeps_keys_outputs_and_gradients():
    model = build_teacher("llama3")
    wrapped = copy.deepcopy(model)
    for block in wrapped.layers:
        checkpoint_block(block)
    assert list(wrapped.state_dict()) == list(model.state_dict())
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    calls = _count_mlp_calls(wrapped)
    loss, grads = _loss_and_grads(model, tokens)
    wrapped_loss, wrapped_grads = _loss_and_grads(wrapped, tokens)
    # each block ran forward once, then again in backward (the recomputation)
    assert calls[0] == 2 * len(wrapped.layers)
    # recomputation replays the same float operations: equal bit for bit
    assert torch.equal(wrapped_loss, loss)
    assert sorted(wrapped_grads) == sorted(grads) and len(grads) > 2 * len(model.layers)
    for k, g in grads.items():
        assert torch.equal(wrapped_grads[k], g), k


def test_parallelize_on_one_process_is_checkpointing_only_when_asked():
    model = build_teacher("qwen2")
    calls = _count_mlp_calls(model)
    tokens = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(1))
    assert parallelize(model) is model
    _loss_and_grads(model, tokens)
    assert calls[0] == len(model.layers)  # nothing applied: no recomputation
    model.zero_grad()
    calls[0] = 0
    parallelize(model, activation_checkpointing=True)
    _loss_and_grads(model, tokens)
    assert calls[0] == 2 * len(model.layers)


def test_init_distributed_without_torchrun_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed("cpu") == (0, 1)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("device,cpu_offload,backend", [
    ("cpu", False, "gloo"), ("cpu", True, "gloo"), ("cuda", False, "nccl"),
    # FSDP2's CPU offload keeps the sharded gradients on the CPU: the norm's all-reduce and the
    # export's gathers need a CPU backend beside NCCL (torchtune's get_distributed_backend)
    ("cuda", True, "cuda:nccl,cpu:gloo")])
def test_init_distributed_picks_the_backend(monkeypatch, device, cpu_offload, backend):
    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: "backend" in calls)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend: calls.update(backend=backend))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.update(device=i))
    assert init_distributed(device, cpu_offload) == (1, 2)
    assert calls == {"backend": backend, **({"device": 1} if device == "cuda" else {})}
    torch.distributed.Backend(backend)  # a backend string torch parses


def test_the_other_ranks_outwait_rank_0s_file_work(tmp_path):
    """Rank 0 alone reads a checkpoint (``on_rank0``) and writes exports and checkpoints before
    a ``barrier``; the others wait on a gloo group of their own (``LONG_WAIT``), not on the
    default group, whose timeout (NCCL's 10-minute watchdog on a GPU) would stop them. Shown
    with a default group timing out after 2 s and 5 s of rank 0's work: the project's waits
    outlast it, a plain barrier of the default group does not. When rank 0's process ends
    meanwhile (it reports its own error), the waiting rank raises ``ReportedElsewhere``, which
    ``reports_user_errors`` does not print."""
    from pathlib import Path

    from tad_torchtune.parallel import LONG_WAIT
    from tests.helpers.tune import two_ranks

    assert LONG_WAIT.total_seconds() >= 3600
    _, ranks = two_ranks(Path(__file__).parent / "helpers" / "rank0_waits.py", [tmp_path],
                         cwd=tmp_path, timeout=120)
    assert [r["shared"] for r in ranks] == [42, 42]
    assert ranks[1]["barrier_waited_s"] > 4  # it waited for rank 0's 5 s, past the 2 s timeout
    assert ranks[1]["default_barrier"] == "timed out", ranks
    # rank 0 gone while rank 1 waits: not an error of rank 1's own, and known at once
    assert ranks[1]["rank_0_gone"] == "ReportedElsewhere (status 1)"
    assert ranks[1]["rank_0_gone_s"] < 30


@pytest.mark.parametrize("message,raised", [
    ("[pair.cc:553] Connection closed by peer [127.0.0.1]:3105", "elsewhere"),
    ("[pair.cc:589] Read error [10.0.0.2]:4321: Connection reset by peer", "elsewhere"),
    ("[pair.cc:620] Write error: Broken pipe", "elsewhere"),
    ("[unbound_buffer.cc:81] Timed out waiting 2000ms for recv operation to complete", "timeout"),
    ("Gloo connectFullMesh failed with [tcp/pair.cc:144] no error", "as it is"),
    ("[enforce fail at pair.cc:488] op.preamble.length <= op.nbytes. 8 vs 4", "as it is"),
])
def test_waiting_says_who_reports_a_failed_wait(message, raised):
    """A wait whose other end has gone is that process's to report (``ReportedElsewhere``,
    which ``reports_user_errors`` does not print); a timeout says how long it waited; any other
    failure (a group that cannot connect, a desynchronised collective: a bug) propagates as it
    is, with its traceback."""
    from tad_torchtune.errors import ReportedElsewhere
    from tad_torchtune.parallel import LONG_WAIT, waiting

    error = RuntimeError(message)
    with pytest.raises(BaseException) as got:
        with waiting("rank 0"):
            raise error
    if raised == "elsewhere":
        assert isinstance(got.value, ReportedElsewhere) and got.value.status == 1
        assert str(got.value) == f"another rank stopped while this one waited for rank 0: {message}"
    elif raised == "timeout":
        assert type(got.value) is RuntimeError
        assert str(got.value) == f"waited {LONG_WAIT} for rank 0: {message}"
    else:
        assert got.value is error


def test_rank_0s_own_error_outranks_a_failed_broadcast(monkeypatch):
    """Rank 0's ``fn`` failed, and sharing that with the others failed too (one of them had
    gone): rank 0 raises its own error, which it prints; the other process reports its own."""
    import torch.distributed as dist

    from tad_torchtune import parallel

    def broadcast(*args, **kwargs):
        raise RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:3105")

    for name, value in (("is_initialized", lambda: True), ("get_world_size", lambda: 2),
                        ("get_rank", lambda: 0), ("broadcast_object_list", broadcast)):
        monkeypatch.setattr(dist, name, value)
    monkeypatch.setattr(parallel, "waiting_group", lambda: "group")

    def fn():
        raise ValueError("teacher_checkpointer.checkpoint_files: truncated")

    with pytest.raises(ValueError, match="truncated"):
        parallel.on_rank0(fn)
    from tad_torchtune.errors import ReportedElsewhere

    with pytest.raises(ReportedElsewhere):  # without an error of its own: the broadcast's
        parallel.on_rank0(lambda: 1)


def test_preemption_grace_is_torchruns_shutdown_timeout(monkeypatch):
    """How long torchrun waits after passing a SIGTERM on: none without torchrun; its
    environment variable where this torch's agent reads it, else 30 s."""
    from torch.distributed.launcher.api import LaunchConfig

    from tad_torchtune.parallel import preemption_grace_s, shutdown_timeout_settable

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "120")
    assert preemption_grace_s() is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    settable = shutdown_timeout_settable()
    assert settable == hasattr(LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=1),
                               "shutdown_timeout")
    assert preemption_grace_s() == (120 if settable else 30)
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
    assert preemption_grace_s() == 30
