"""Benchmarks of the token store (``tad_torchtune.data``): prepare throughput, dataset start-up
and memory against the store's size, and the cost of a batch against a training step.

    python benchmarks/data_bench.py --json /tmp/data_bench.json

1. prepare: the bundled demo corpus (JSON lines) repeated ``--copies`` times (4.1M tokens at 8),
   tokenized by the demo tokenizer and by a 32K-vocabulary byte-level BPE trained here on the
   bundled text (both torchtune ``HuggingFaceBaseTokenizer``). Tokens per second of:

   - ``encode_batch`` / ``encode_batch_fast``: the ``tokenizers`` library's own batch encoding of
     every document, already in memory, on every core: the ceiling;
   - ``prepare``: ``tad_torchtune.data.build_store`` (read and hash the file, batch engine, write
     the store), every core;
   - ``workers``: ``build_store`` with the worker-process engine, every core (what tokenizers
     without a batch engine get);
   - ``before``: the pre-store dataset's start-up: every document read, ``tokenizer.encode``d
     into one Python list, then a tensor; one core.

   Counted tokens are the text's (BOS/EOS excluded) for all five. Measured in turn, ``--repeats``
   rounds; medians, and prepare / ceiling as the median over rounds of prepare's rate over the
   faster batch encoding of the same round (paired, as the machine's load drifts).
2. start-up: stores of 10M, 100M and 1B synthetic token ids (uint16 below 2048, documents of 1
   to 1023 tokens) written with ``StoreWriter`` under the key of a stand-in source file; in a
   fresh process each, ``--repeats`` times: the time of ``TextBlockDataset(...)`` (tokenizer
   fingerprint, key, manifest, maps, split) and the resident memory it adds (VmRSS), with the
   page cache warm (the files were just written; opening reads none of them).
3. batch: one 8 x 128 batch (random indices, ``collate``) from each store, median over
   2000 batches (the sampler's own time apart: its median, and its first call, which sets the
   epoch's order up), against the step time of ``tune run tad_distill --config demo max_steps=20``
   (median over its logged steps of step tokens / tokens_per_second), or ``--step-time``.
"""

import argparse
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEMO_CORPUS = ROOT / "tad_torchtune" / "assets" / "demo" / "jargon.jsonl.gz"
SIZES = {"10M": 10_000_000, "100M": 100_000_000, "1B": 1_000_000_000}
SEQ_LEN, BATCH = 128, 8


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown"


# ------------------------------------------------------------------------------------ prepare


def train_bpe(folder: Path, docs: list[str], vocab: int = 32_000):
    """A byte-level BPE of ``vocab`` ids trained on ``docs``, as a HuggingFaceBaseTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, min_frequency=1, show_progress=False,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(docs, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}))
    return HuggingFaceBaseTokenizer(str(folder / "tokenizer.json"),
                                    tokenizer_config_json_path=str(folder / "tokenizer_config.json"))


def bench_prepare(work: Path, copies: int, repeats: int) -> list[dict]:
    import shutil

    import torch

    from tad_torchtune.data import build_store, expand_sources
    from tad_torchtune.data.store import TokenStore, token_dtype_for
    from tad_torchtune.demo import demo_tokenizer

    corpus = work / "corpus.jsonl"
    corpus.write_bytes(gzip.decompress(DEMO_CORPUS.read_bytes()) * copies)
    docs = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    files = expand_sources(str(corpus))
    demo_docs = docs[: len(docs) // copies]
    tokenizers = {"demo (2048)": demo_tokenizer(), "bpe32k": train_bpe(work / "bpe32k", demo_docs)}
    rows = []
    for name, tok in tokenizers.items():
        dtype = token_dtype_for(tok)
        n_text = sum(len(e.ids) for e in tok.tokenizer.encode_batch(docs))

        def ceiling(method=tok.tokenizer.encode_batch):
            start = time.perf_counter()
            method(docs)
            return time.perf_counter() - start

        def prepare(**kw):
            out = work / "store"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            build_store(out, files, tok, token_dtype=dtype, progress=False, **kw)
            seconds = time.perf_counter() - start
            assert TokenStore.open(out).num_tokens == n_text + 2 * len(docs)
            return seconds

        def before():
            start = time.perf_counter()
            stream: list[int] = []
            with open(corpus, encoding="utf-8") as f:
                for doc in [json.loads(line)["text"] for line in f if line.strip()]:
                    stream.extend(tok.encode(doc, add_bos=True, add_eos=True))
            torch.tensor(stream)
            return time.perf_counter() - start

        measures = {"encode_batch": ceiling,
                    "encode_batch_fast": lambda: ceiling(tok.tokenizer.encode_batch_fast),
                    "prepare": prepare, "workers": lambda: prepare(batch_encode=False),
                    "before": before}
        times: dict[str, list[float]] = {k: [] for k in measures}
        for _ in range(repeats):
            for key, fn in measures.items():
                times[key].append(fn())
        rate = {k: [n_text / t for t in v] for k, v in times.items()}
        # paired: within a round, prepare against the faster of the two batch encodings
        paired = [p / max(a, b) for p, a, b in
                  zip(rate["prepare"], rate["encode_batch"], rate["encode_batch_fast"])]
        row = {"tokenizer": name, "vocab": tok.tokenizer.get_vocab_size(), "text_tokens": n_text,
               "documents": len(docs), "tokens_per_second": rate,
               "median": {k: statistics.median(v) for k, v in rate.items()},
               "prepare_vs_ceiling": paired,
               "prepare_vs_ceiling_median": statistics.median(paired)}
        rows.append(row)
        print(f"prepare  {name:12s} " + "  ".join(f"{k} {v / 1e6:.2f}M/s" for k, v in row["median"].items())
              + f"  prepare/ceiling {row['prepare_vs_ceiling_median']:.2f} (paired; "
              f"{min(paired):.2f}-{max(paired):.2f})", flush=True)
    return rows


# ------------------------------------------------------------------------ start-up and batch


def write_synthetic_store(store_dir: Path, name: str, n_tokens: int) -> Path:
    """A store of ``n_tokens`` random ids under the key of a stand-in source file ``name``."""
    from tad_torchtune.data import StoreWriter, expand_sources
    from tad_torchtune.data.store import MANIFEST, store_key, token_dtype_for, tokenizer_fingerprint
    from tad_torchtune.demo import demo_tokenizer

    tok = demo_tokenizer()
    store_dir.mkdir(parents=True, exist_ok=True)
    src = store_dir / f"{name}.jsonl"
    if not src.exists():
        src.write_text(json.dumps({"text": f"stands in for a {name}-token corpus"}) + "\n")
    files = expand_sources(str(src))
    fp = tokenizer_fingerprint(tok)
    dtype = token_dtype_for(tok)
    path = store_dir / store_key(files, tokenizer_fp=fp, column="text", token_dtype=dtype)
    if (path / MANIFEST).is_file():
        return src
    rng = np.random.default_rng(0)
    chunk = 1 << 24
    with StoreWriter(path, token_dtype=dtype, tokenizer={"fingerprint": fp}, column="text") as w:
        for begin in range(0, n_tokens, chunk):
            size = min(chunk, n_tokens - begin)
            lengths = rng.integers(1, 1024, size // 256 + 2)
            lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), size)) + 1]
            lengths[-1] -= int(lengths.sum()) - size
            w.append(rng.integers(0, 2048, size, dtype=np.uint16), lengths[lengths > 0])
        f = files[0]
        w.add_source({"path": str(f.path), "size": f.size, "mtime_ns": f.mtime_ns, "sha256": None,
                      "num_documents": w.num_documents, "num_tokens": w.num_tokens})
        w.publish({"engine": "synthetic"})
    return src


def vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def startup_child(store_dir: str, source: str, batches: int) -> None:
    """In a fresh process: open the dataset, fetch batches; print one JSON line. Memory is split
    into anonymous pages (this process's own) and mapped file pages (the store's, in the page
    cache: clean, shared with every process mapping them, reclaimable)."""
    from tad_torchtune.data import ResumableBatchSampler, TextBlockDataset, collate
    from tad_torchtune.demo import demo_tokenizer

    tok = demo_tokenizer()
    fields = ("VmRSS", "RssAnon", "RssFile")
    before = {k: vm_kib(k) for k in fields}
    start = time.perf_counter()
    ds = TextBlockDataset(tok, source=source, max_seq_len=SEQ_LEN, store_dir=store_dir)
    opened = time.perf_counter() - start
    after_open = {k: vm_kib(k) for k in fields}
    sampler = iter(ResumableBatchSampler(len(ds), batch_size=BATCH, shuffle=True, seed=0))
    times, sampled = [], []
    for _ in range(batches):
        start = time.perf_counter()
        indices = next(sampler)
        sampled.append(time.perf_counter() - start)
        start = time.perf_counter()
        batch = collate([ds[i] for i in indices])
        times.append(time.perf_counter() - start)
    assert batch.tokens.shape == (BATCH, SEQ_LEN)
    after_batches = {k: vm_kib(k) for k in fields}
    # sample_s: the sampler's share of a batch (its first call sets the epoch's order up)
    result = {"open_s": opened, "batch_s": statistics.median(times), "blocks": len(ds),
              "sample_s": statistics.median(sampled), "first_sample_s": sampled[0],
              "tokens": ds.store.num_tokens, "rss_total_mib": after_open["VmRSS"] / 1024,
              "hwm_mib": vm_kib("VmHWM") / 1024}
    for k in fields:
        result[f"{k}_open_mib"] = (after_open[k] - before[k]) / 1024
        result[f"{k}_batches_mib"] = (after_batches[k] - before[k]) / 1024
    print(json.dumps(result))


def prepare_memory_child(corpus: str, out: str) -> None:
    """In a fresh process: build the store of ``corpus`` with the demo tokenizer; print the peak
    resident memory added by the build (VmHWM after - VmRSS before)."""
    from tad_torchtune.data import build_store, expand_sources
    from tad_torchtune.demo import demo_tokenizer

    tok = demo_tokenizer()
    files = expand_sources(corpus)
    tok.tokenizer.encode_batch(["warm up the thread pool"] * 64)
    before = vm_kib("VmRSS")
    build_store(Path(out), files, tok, progress=False)
    print(json.dumps({"peak_growth_mib": (vm_kib("VmHWM") - before) / 1024,
                      "corpus_mib": files[0].size / 2**20}))


def bench_prepare_memory(work: Path, copies: list[int]) -> list[dict]:
    import shutil

    rows = []
    text = gzip.decompress(DEMO_CORPUS.read_bytes())
    for n in copies:
        corpus = work / f"memory_{n}.jsonl"
        corpus.write_bytes(text * n)
        shutil.rmtree(work / "memory_store", ignore_errors=True)
        out = subprocess.run([sys.executable, __file__, "--_prepare_child", str(corpus),
                              str(work / "memory_store")], capture_output=True, text=True, check=True)
        row = {"copies": n, **json.loads(out.stdout.strip().splitlines()[-1])}
        rows.append(row)
        corpus.unlink()
        print(f"prepare  memory: {n:3d} copies ({row['corpus_mib']:.0f} MiB of JSONL): peak RSS "
              f"+{row['peak_growth_mib']:.0f} MiB", flush=True)
    return rows


def bench_startup(work: Path, sizes: list[str], repeats: int, batches: int) -> list[dict]:
    rows = []
    for name in sizes:
        start = time.perf_counter()
        src = write_synthetic_store(work / "stores", name, SIZES[name])
        written = time.perf_counter() - start
        runs = []
        for _ in range(repeats):
            out = subprocess.run(
                [sys.executable, __file__, "--_child", str(work / "stores"), str(src), str(batches)],
                capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        row = {"store": name, "written_s": written, "runs": runs,
               "median": {k: statistics.median(r[k] for r in runs) for k in runs[0]}}
        rows.append(row)
        m = row["median"]
        print(f"startup  {name:5s} open {m['open_s'] * 1e3:.1f} ms  RSS +{m['VmRSS_open_mib']:.1f} "
              f"MiB (anon +{m['RssAnon_open_mib']:.1f}, file +{m['RssFile_open_mib']:.1f}); after "
              f"{batches} batches anon +{m['RssAnon_batches_mib']:.1f}, file "
              f"+{m['RssFile_batches_mib']:.1f} MiB; batch {m['batch_s'] * 1e6:.0f} us, sampler "
              f"{m['sample_s'] * 1e6:.0f} us (first {m['first_sample_s'] * 1e3:.1f} ms)", flush=True)
    return rows


def demo_step_time(work: Path) -> dict:
    from tad_torchtune.demo import tune_command

    import shutil

    out = work / "demo_run"
    shutil.rmtree(out, ignore_errors=True)  # the recipe appends to an existing metrics.jsonl
    subprocess.run([*tune_command(), "run", "tad_distill", "--config", "demo", "max_steps=20",
                    f"output_dir={out}", "export_hf=false", "eval_every_n_steps=null",
                    "save_every_n_steps=null"],
                   check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "tokens_per_second" in r]
    times = [r["step_tokens"] / r["tokens_per_second"] if "step_tokens" in r else
             BATCH * SEQ_LEN / r["tokens_per_second"] for r in steps]
    return {"steps": [r["step"] for r in steps], "step_s": times, "median_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--copies", type=int, default=8, help="demo corpus copies to prepare")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--batches", type=int, default=2000, help="batches timed per store")
    parser.add_argument("--step-time", type=float, help="demo step time in s (default: measure it)")
    parser.add_argument("--memory-copies", type=int, nargs="+", default=[1, 8, 64],
                        help="corpus sizes (demo copies) whose prepare peak memory is measured")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["prepare", "memory", "startup", "step"])
    parser.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--_prepare_child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        startup_child(args._child[0], args._child[1], int(args._child[2]))
        return
    if args._prepare_child:
        prepare_memory_child(*args._prepare_child)
        return
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="data_bench_")
        args.work = Path(tmp.name)
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TAD_TORCHTUNE_STORE_DIR", str(args.work / "demo_stores"))
    report = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                          "affinity": len(os.sched_getaffinity(0))},
              "command": " ".join([Path(sys.executable).name, *sys.argv])}
    print(f"machine: {report['machine']}", flush=True)
    if "prepare" not in args.skip:
        report["prepare"] = bench_prepare(args.work, args.copies, args.repeats)
    if "memory" not in args.skip:
        report["prepare_memory"] = bench_prepare_memory(args.work, args.memory_copies)
    if "startup" not in args.skip:
        report["startup"] = bench_startup(args.work, args.sizes, args.repeats, args.batches)
    if args.step_time is not None:
        report["step"] = {"median_s": args.step_time, "given": True}
    elif "step" not in args.skip:
        report["step"] = demo_step_time(args.work)
    if "startup" in report and "step" in report:
        step = report["step"]["median_s"]
        for row in report["startup"]:
            row["batch_vs_step"] = row["median"]["batch_s"] / step
        print(f"step     demo {step * 1e3:.0f} ms; batch / step: " + ", ".join(
            f"{r['store']} {r['batch_vs_step']:.3%}" for r in report["startup"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
