"""Started by tests/test_parallel.py under torch.distributed.run (two gloo processes) with a
default process group that times out after 2 s, as NCCL's watchdog times out after 10 minutes:
rank 0 works 5 s alone (a checkpoint read in ``on_rank0``, file work before ``barrier``) while
rank 1 waits, first in the project's waits, which must outlast it, then in a plain barrier of
the default group, which must not (so the timeout is real); last, rank 0's process ends while
rank 1 waits in ``barrier``, which must raise ``ReportedElsewhere`` at once (rank 0 reports its
own error). Each rank writes what happened to OUT/rank<r>.json."""

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
from torch.distributed.distributed_c10d import _set_pg_timeout

from tad_torchtune.errors import ReportedElsewhere
from tad_torchtune.parallel import barrier, on_rank0

WORK_S = 5.0

if __name__ == "__main__":
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")  # the default timeout while the two processes connect
    dist.barrier()
    _set_pg_timeout(timedelta(seconds=2))
    rank = dist.get_rank()
    seen = {}
    _, seen["shared"] = on_rank0(lambda: time.sleep(WORK_S) or 7, share=lambda n: n * 6)
    if rank == 0:
        time.sleep(WORK_S)
    start = time.perf_counter()
    barrier()
    seen["barrier_waited_s"] = time.perf_counter() - start
    if rank == 0:
        time.sleep(WORK_S)
    try:
        dist.barrier()
        seen["default_barrier"] = "passed"
    except RuntimeError as err:
        seen["default_barrier"] = "timed out" if "imed out" in str(err) else str(err)
    if rank == 0:
        (out / "rank0.json").write_text(json.dumps(seen))
        os._exit(0)  # gone, as after an error it reported
    start = time.perf_counter()
    try:
        barrier()
        seen["rank_0_gone"] = "passed"
    except ReportedElsewhere as err:
        seen["rank_0_gone"] = f"ReportedElsewhere (status {err.status})"
    seen["rank_0_gone_s"] = time.perf_counter() - start
    (out / "rank1.json").write_text(json.dumps(seen))
