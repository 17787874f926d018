"""The store format: tokenizer fingerprints, atomic publication, a reader that maps without
reading, and a missing store built once by two processes under torchrun."""

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tad_torchtune.data import StoreError, StoreWriter, TokenStore, expand_sources, prepare_store
from tad_torchtune.data.store import (
    FORMAT, FORMAT_VERSION, MANIFEST, OFFSETS, TOKENS, content_fingerprint, store_key,
    tokenizer_fingerprint,
)
from tests.data.reference import DEMO_CORPUS
from tests.helpers.toy_tokenizers import ByteTokenizer, hf_tokenizer
from tests.helpers.tune import two_ranks

SCRIPT = Path(__file__).parents[1] / "helpers" / "open_store_distributed.py"

FINGERPRINT_SCRIPT = """
from tad_torchtune.data import tokenizer_fingerprint
from tad_torchtune.demo import demo_tokenizer
print(tokenizer_fingerprint(demo_tokenizer()))
"""


def test_tokenizer_fingerprint(demo_tok, tmp_path):
    from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer

    from tad_torchtune.data import resolve_asset
    from tad_torchtune.demo import demo_tokenizer

    fp = tokenizer_fingerprint(demo_tok)
    assert len(fp) == 64 and fp == tokenizer_fingerprint(demo_tokenizer(max_seq_len=256))
    plain = HuggingFaceBaseTokenizer(resolve_asset("pkg://demo/tokenizer.json"),
                                     tokenizer_config_json_path=resolve_asset("pkg://demo/tokenizer_config.json"))
    assert tokenizer_fingerprint(plain) == fp  # pad_id, stop_tokens, max_seq_len: not part of it
    # another process, another hash seed: the same
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    out = subprocess.run([sys.executable, "-c", FINGERPRINT_SCRIPT], capture_output=True,
                         text=True, env={**os.environ, "PYTHONHASHSEED": seed}, check=True)
    assert out.stdout.strip() == fp
    others = {tokenizer_fingerprint(hf_tokenizer(tmp_path / "a")),
              tokenizer_fingerprint(hf_tokenizer(tmp_path / "b", template=True)),
              tokenizer_fingerprint(ByteTokenizer()), tokenizer_fingerprint(ByteTokenizer(300))}
    assert len(others) == 4 and fp not in others
    plain.eos_id = 2  # the same tokenizer.json, another EOS
    assert tokenizer_fingerprint(plain) != fp


def _writer(path, **kw):
    return StoreWriter(path, token_dtype="uint16", tokenizer={"fingerprint": "f" * 64}, column="text", **kw)


def test_writer_publishes_atomically_or_not_at_all(tmp_path):
    with pytest.raises(RuntimeError):
        with _writer(tmp_path / "s") as w:
            w.append(np.arange(10, dtype=np.uint16), np.array([4, 6]))
            assert w.tmp.is_dir() and not (tmp_path / "s").exists()
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with _writer(tmp_path / "s") as w:
        w.append(np.arange(10, dtype=np.uint16), np.array([4, 6]))
        w.append(np.arange(3, dtype=np.uint16), np.array([0, 3]))
        w.publish({"engine": "test"})
    assert [p.name for p in tmp_path.iterdir()] == ["s"]
    store = TokenStore.open(tmp_path / "s")
    assert store.tokens.tolist() == list(range(10)) + [0, 1, 2]
    assert store.offsets.tolist() == [0, 4, 10, 10, 13]
    assert (store.num_tokens, store.num_documents) == (13, 4)
    assert store.fingerprint == content_fingerprint(store.manifest)
    # a second build of the same store, published later, is discarded for the first one
    with _writer(tmp_path / "s") as w:
        w.append(np.arange(13, dtype=np.uint16), np.array([13]))
        assert w.publish() == tmp_path / "s"
    assert TokenStore.open(tmp_path / "s").num_documents == 4
    assert [p.name for p in tmp_path.iterdir()] == ["s"]
    with pytest.raises(StoreError) as info:
        with _writer(tmp_path / "empty") as w:
            w.publish()
    assert str(info.value) == ("the corpus of empty holds no token; accepted: at least one "
                               "document that the tokenizer turns into tokens")
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_reader_refuses_another_tokenizer_and_a_damaged_store(tmp_path, demo_tok):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(20)))
    store, built = prepare_store(str(src), demo_tok, store_dir=tmp_path / "stores")
    assert built and not prepare_store(str(src), demo_tok, store_dir=tmp_path / "stores")[1]
    # the store copied to where another tokenizer's store of the same file would be
    other = ByteTokenizer()
    files = expand_sources(str(src))
    key = store_key(files, tokenizer_fp=tokenizer_fingerprint(other), column="text", token_dtype="uint16")
    os.rename(store.path, tmp_path / "stores" / key)
    with pytest.raises(StoreError) as info:
        prepare_store(str(src), other, store_dir=tmp_path / "stores", where="validation_dataset")
    path = tmp_path / "stores" / key
    assert str(info.value) == (
        f"validation_dataset: the token store '{path}' was built by another tokenizer (fingerprint "
        f"{tokenizer_fingerprint(demo_tok)[:16]}, this tokenizer's is "
        f"{tokenizer_fingerprint(other)[:16]}); accepted: a store built by this tokenizer (delete "
        "the folder and it is rebuilt, or set validation_dataset.store_dir to another folder)")
    with open(path / TOKENS, "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(StoreError) as info:
        TokenStore.open(path)
    assert str(info.value) == (f"dataset: the token store '{path}' is damaged: tokens.bin holds "
                               f"{store.num_tokens * 2 + 2} bytes, its manifest says "
                               f"{store.num_tokens * 2}; delete the folder and it is rebuilt")


def _vm_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_opening_a_billion_token_store_reads_none_of_it(tmp_path, demo_tok):
    """A 1B-token store whose token file is sparse (2 GB that were never written): a start-up or
    a block that read in proportion to its size would take seconds and map the pages."""
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "stands in for a large corpus"}\n')
    files = expand_sources(str(src))
    fp = tokenizer_fingerprint(demo_tok)
    path = tmp_path / "stores" / store_key(files, tokenizer_fp=fp, column="text", token_dtype="uint16")
    path.mkdir(parents=True)
    n_tokens, n_docs = 1_000_000_000, 1_000_000
    with open(path / TOKENS, "wb") as f:
        f.truncate(2 * n_tokens)
    offsets = np.linspace(0, n_tokens, n_docs + 1).astype("<i8")
    offsets.tofile(path / OFFSETS)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "token_dtype": "uint16",
                "tokenizer": {"fingerprint": fp}, "column": "text", "num_tokens": n_tokens,
                "num_documents": n_docs, "tokens_sha256": "sparse", "offsets_sha256": "-",
                "sources": [{"path": str(f.path), "size": f.size, "mtime_ns": f.mtime_ns} for f in files]}
    manifest["fingerprint"] = content_fingerprint(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))

    from tad_torchtune.data import TextBlockDataset, collate

    rss, start = _vm_rss(), time.perf_counter()
    ds = TextBlockDataset(demo_tok, source=str(src), max_seq_len=128, store_dir=tmp_path / "stores")
    opened = time.perf_counter() - start
    batch = collate([ds[i] for i in np.random.default_rng(0).integers(0, len(ds), 8)])
    growth = _vm_rss() - rss
    assert ds.store_path == path and len(ds) == (n_tokens - n_tokens // 20) // 128
    assert batch.tokens.shape == (8, 128) and batch.document_ids.max() <= 1
    assert opened < 1.0, opened
    assert growth < 64 * 2**20, growth


@pytest.mark.slow
def test_two_processes_build_the_store_once(tmp_path):
    """Two processes under torchrun open a dataset whose store is missing: it is built once, by
    rank 0, and both read the same blocks."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(gzip.decompress(DEMO_CORPUS.read_bytes()) * 3)  # ~1.5M tokens
    stores = tmp_path / "stores"
    proc, ranks = two_ranks(SCRIPT, [corpus, stores, tmp_path], cwd=tmp_path)
    assert ranks[0]["built_by"] == ranks[0]["pid"] != ranks[1]["pid"]
    assert proc.stderr.count("tad_torchtune: building the token store") == 1
    for key in ("len", "fingerprint", "store", "first"):
        assert ranks[0][key] == ranks[1][key], key
    assert [p.name for p in stores.iterdir() if not p.name.startswith(".")] == [Path(ranks[0]["store"]).name]
    assert list(stores.glob(".tmp-*")) == []
