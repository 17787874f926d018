"""Started by tests/models/test_loading.py under torch.distributed.run (gloo, CPU): each rank
loads a tiny teacher built on the meta device and sharded there (``load_teacher`` with
``parallelize(fsdp=True)`` as ``prepare``; MODE ``from_rank0``: only rank 0 holds the
checkpoint, broadcast tensor by tensor, ``every``: every rank holds it), runs
``parallel.on_rank0`` (a result, a shared value, rank 0's errors), and writes to
OUT/rank<r>.json what it received:
per sharded parameter, whether its local part is that rank's slice of the checkpoint tensor (as
``distribute_tensor`` cuts it); the logits against the unsharded model's; and ``_local_shard``
on tensors of 1 and 3 rows, which two ranks share unevenly."""

import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from tad_torchtune.models.loading import _local_shard, load_teacher
from tad_torchtune.parallel import on_rank0, parallelize
from tests.helpers.teachers import SEQ, VOCAB, build_teacher, teacher_node

if __name__ == "__main__":
    case, folder, out, mode = sys.argv[1:5]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    reference = build_teacher(case).eval()  # the same seed on both ranks
    state = reference.state_dict()
    # one tensor as a weight conversion may hand it over: a non-contiguous view
    square = state["layers.0.attn.q_proj.weight"]
    state["layers.0.attn.q_proj.weight"] = square.t().contiguous().t()
    rng = torch.get_rng_state()
    from_rank0 = mode == "from_rank0"  # rank 0 alone holds the checkpoint and broadcasts it
    teacher = load_teacher(OmegaConf.create(teacher_node(case)),
                           OmegaConf.create({"checkpoint_dir": folder}),
                           device=torch.device("cpu"), dtype=torch.float32,
                           state=dict(state) if rank == 0 or not from_rank0 else None,
                           prepare=partial(parallelize, fsdp=True), from_rank0=from_rank0)
    drew = not torch.equal(rng, torch.get_rng_state())
    shards, local, whole = {}, 0, 0
    for name, p in teacher.named_parameters():
        if not isinstance(p, DTensor):
            continue
        cut = distribute_tensor(state[name], p.device_mesh, p.placements, src_data_rank=None)
        shards[name] = torch.equal(p.to_local(), cut.to_local())
        local += p.to_local().numel()
        whole += p.numel()
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (teacher(tokens) - reference(tokens)).abs().max().item()
    mesh = init_device_mesh("cpu", (2,))
    uneven = {}
    for name, full in (("1", torch.arange(4.0).reshape(1, 4)),
                       ("3", torch.arange(12.0).reshape(3, 4)),
                       ("3t", torch.arange(12.0).reshape(4, 3).t())):  # non-contiguous
        like = distribute_tensor(torch.empty(full.shape, device="meta"), mesh, [Shard(0)])
        ours = _local_shard(full, like, torch.device("cpu"))
        theirs = distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None)
        uneven[name] = (torch.equal(ours.to_local(), theirs.to_local())
                        and ours.to_local().is_contiguous()
                        and ours.shape == like.shape and ours.stride() == like.stride()
                        and torch.equal(ours.full_tensor(), full))
    # on_rank0: the result on rank 0 only, what it shares everywhere, its errors everywhere
    errors = {}
    for kind, fail in (("user", ValueError("teacher_checkpointer.checkpoint_files: truncated")),
                       ("other", KeyError("x"))):
        def boom(fail=fail):
            if dist.get_rank() == 0:
                raise fail
        try:
            on_rank0(boom)
        except Exception as err:  # noqa: BLE001
            errors[kind] = f"{type(err).__name__}: {err}" + (
                f" (status {err.status})" if hasattr(err, "status") else "")
    result, shared = on_rank0(lambda: {"rank": rank}, lambda r: r["rank"] + 10)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({
        "on_rank0": {"errors": errors, "result": result, "shared": shared},
        "drew_random_numbers": drew, "shards": shards, "local": local, "whole": whole,
        "logits_max_diff": diff, "requires_grad": any(p.requires_grad for p in teacher.parameters()),
        "uneven": uneven,
    }))
    dist.destroy_process_group()
