"""Started by tests/data/test_store.py under torch.distributed.run: each rank opens the same
dataset (whose store does not exist yet) and writes what it got to OUT/rank<r>.json."""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from tad_torchtune.data import text_block_dataset
from tad_torchtune.demo import demo_tokenizer

if __name__ == "__main__":
    source, store_dir, out = sys.argv[1:4]
    dist.init_process_group("gloo")
    ds = text_block_dataset(demo_tokenizer(), source=source, max_seq_len=128, store_dir=store_dir)
    dist.barrier()
    rank = dist.get_rank()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "pid": os.getpid(), "len": len(ds), "fingerprint": ds.fingerprint,
        "store": str(ds.store_path), "built_by": ds.store.manifest["build"]["pid"],
        "first": ds[0]["tokens"][:8].tolist(),
    }))
    dist.destroy_process_group()
