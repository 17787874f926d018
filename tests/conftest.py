import os

import pytest
import torch

#: pytest-xdist's workers (the README's ``-n 2``): 1 when the tests run in this process alone
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))

if WORKERS > 1:
    # The workers share the machine's cores: each takes its share of threads, for its own
    # operators and for the processes its tests start (they inherit OMP_NUM_THREADS), instead
    # of every worker's threads contending for all of them (benchmarks/RESULTS.md, "The test
    # suite": 2 workers of 2 threads on 2 cores took 505 s, of 1 thread 456 s)
    THREADS = max(1, len(os.sched_getaffinity(0)) // WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="session", autouse=True)
def token_store_dir(tmp_path_factory):
    """Token stores built by the tests (in this process and in the `tune run`s it starts) go to a
    temporary folder, never to the user's ~/.cache."""
    before = os.environ.get("TAD_TORCHTUNE_STORE_DIR")
    os.environ["TAD_TORCHTUNE_STORE_DIR"] = str(tmp_path_factory.mktemp("token_stores"))
    yield os.environ["TAD_TORCHTUNE_STORE_DIR"]
    if before is None:
        del os.environ["TAD_TORCHTUNE_STORE_DIR"]
    else:
        os.environ["TAD_TORCHTUNE_STORE_DIR"] = before
