"""Building token stores: the engines agree with tokenizer.encode and with each other byte for
byte; bad input fails with one clear line and leaves nothing behind."""

import gzip
import hashlib
import os
import json

import numpy as np
import pytest

from tad_torchtune.data import StoreError, build_store, expand_sources, prepare_store
from tad_torchtune.data.prepare import BatchEncoder, batch_encoder
from tad_torchtune.data.store import MANIFEST, OFFSETS, TOKENS, TokenStore
from tests.data.reference import encode_all
from tests.helpers.toy_tokenizers import ByteTokenizer, hf_tokenizer


def _flat(encoded):
    return [t for ids in encoded for t in ids], [len(ids) for ids in encoded]


def test_batch_engine_gives_the_ids_of_encode_on_the_demo_corpus(demo_tok, demo_docs):
    assert isinstance(batch_encoder(demo_tok), BatchEncoder)
    tokens, lengths = batch_encoder(demo_tok)(demo_docs, "uint16")
    ref_tokens, ref_lengths = _flat(encode_all(demo_tok, demo_docs))
    assert lengths.tolist() == ref_lengths and tokens.tolist() == ref_tokens
    assert tokens.dtype == np.uint16 and len(ref_tokens) == 515_859


def test_batch_engine_when_the_hf_post_processor_adds_bos_and_eos(tmp_path, demo_docs):
    docs = demo_docs[:200] + ["", " ", "\n\n"]
    for template in (False, True):
        tok = hf_tokenizer(tmp_path / str(template), template=template)
        assert (tok.hf_adds_bos, tok.hf_adds_eos) == (template, template)
        tokens, lengths = batch_encoder(tok)(docs, "uint16")
        ref = encode_all(tok, docs)
        assert all(ids[0] == 0 and ids[-1] == 1 and 1 not in ids[:-1] for ids in ref)
        assert (tokens.tolist(), lengths.tolist()) == _flat(ref)


def test_no_batch_engine_for_other_tokenizers(demo_tok):
    class Custom(type(demo_tok)):  # an overridden encode must be called as it is
        def encode(self, text, add_bos=True, add_eos=True):
            return super().encode(text.lower(), add_bos, add_eos)

    custom = Custom.__new__(Custom)
    custom.__dict__.update(demo_tok.__dict__)
    assert batch_encoder(custom) is None and batch_encoder(ByteTokenizer()) is None


def _two_files(folder, docs):
    """The demo documents in two files, one gzip JSON lines, one plain."""
    folder.mkdir()
    half = len(docs) // 2
    with gzip.open(folder / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[:half])
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[half:]))
    return expand_sources(str(folder))


def _comparable(path):
    manifest = json.loads((path / MANIFEST).read_text())
    for key in ("created", "build"):
        del manifest[key]
    return (path / TOKENS).read_bytes(), (path / OFFSETS).read_bytes(), manifest


def test_parallel_equals_single_process_byte_for_byte(tmp_path, demo_tok, demo_docs):
    """batch engine, 2 worker processes and one process: the same three files (but timings)."""
    files = _two_files(tmp_path / "corpus", demo_docs)
    built = {
        "batch": build_store(tmp_path / "batch", files, demo_tok, progress=False),
        "workers": build_store(tmp_path / "workers", files, demo_tok, num_workers=2,
                               batch_encode=False, progress=False),
        "inline": build_store(tmp_path / "inline", files, demo_tok, num_workers=1,
                              batch_encode=False, progress=False),
    }
    engines = {name: json.loads((p / MANIFEST).read_text())["build"]["engine"] for name, p in built.items()}
    assert engines == {"batch": "batch", "workers": "workers", "inline": "inline"}
    reference = _comparable(built["inline"])
    assert _comparable(built["batch"]) == reference
    assert _comparable(built["workers"]) == reference
    # and the content is the reference's
    store = TokenStore.open(built["workers"])
    ref_tokens, ref_lengths = _flat(encode_all(demo_tok, demo_docs))
    assert store.tokens.tolist() == ref_tokens
    assert np.diff(store.offsets).tolist() == ref_lengths
    sources = store.manifest["sources"]
    assert [s["num_documents"] for s in sources] == [len(demo_docs) // 2, len(demo_docs) - len(demo_docs) // 2]
    assert sum(s["num_tokens"] for s in sources) == store.num_tokens == len(ref_tokens)


def test_worker_engine_for_a_plain_tokenizer(tmp_path):
    src = tmp_path / "c.jsonl"
    docs = [f"document {i} " * (i % 7) for i in range(3000)]
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    files = expand_sources(str(src))
    tok = ByteTokenizer()
    a = build_store(tmp_path / "w", files, tok, num_workers=2, progress=False)
    b = build_store(tmp_path / "i", files, tok, num_workers=1, progress=False)
    assert _comparable(a) == _comparable(b)
    assert TokenStore.open(a).tokens.tolist() == _flat(encode_all(tok, docs))[0]


def test_an_id_the_dtype_cannot_hold(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["fine", "also fine", "has Z"]))
    for workers in (1, 2):
        with pytest.raises(StoreError) as info:
            prepare_store(str(src), ByteTokenizer(big_id_for="Z"), store_dir=tmp_path / "s",
                          num_workers=workers)
        assert str(info.value) == (
            f"tokenizer: encode gave id 70000 in document 3 of '{src}', which the store's uint16 "
            "cannot hold (the tokenizer reports a vocabulary of 259 ids); accepted: ids in "
            "[0, 65536): a tokenizer whose vocab_size covers its ids, or dataset.token_dtype: uint32")
        assert [p.name for p in (tmp_path / "s").iterdir() if not p.name.endswith(".lock")] == []
    store, built = prepare_store(str(src), ByteTokenizer(big_id_for="Z"), store_dir=tmp_path / "s",
                                 token_dtype="uint32")
    assert built and store.tokens.dtype == np.uint32 and store.tokens[-2] == 70_000


def test_a_vocabulary_the_dtype_cannot_hold(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "x"}\n')
    with pytest.raises(StoreError) as info:
        prepare_store(str(src), ByteTokenizer(vocab_size=151_646), store_dir=tmp_path,
                      token_dtype="uint16", where="validation_dataset")
    assert str(info.value) == (
        "validation_dataset.token_dtype: 'uint16' holds ids below 65536, but the tokenizer's "
        "vocabulary has 151646 ids; accepted: 'auto' or 'uint32'")
    with pytest.raises(StoreError) as info:
        prepare_store(str(src), ByteTokenizer(), store_dir=tmp_path, token_dtype="int8")
    assert str(info.value) == ("dataset.token_dtype: must be one of ('auto', 'uint16', 'uint32'), "
                               "got 'int8'")
    store, _ = prepare_store(str(src), ByteTokenizer(vocab_size=151_646), store_dir=tmp_path)
    assert store.manifest["token_dtype"] == "uint32"


def test_bad_input_midway_leaves_no_store_and_no_temporary_folder(tmp_path, demo_tok, demo_docs):
    corpus = tmp_path / "corpus"
    _two_files(corpus, demo_docs)
    with open(corpus / "b.jsonl", "a") as f:
        f.write('{"text": "the last line is cut\n')
    n_lines = len(demo_docs) - len(demo_docs) // 2 + 1
    store_dir = tmp_path / "stores"
    with pytest.raises(ValueError) as info:
        prepare_store(str(corpus), demo_tok, store_dir=store_dir, progress=False)
    assert str(info.value) == (f"dataset.source: '{corpus / 'b.jsonl'}' line {n_lines} is not JSON "
                               "(Unterminated string starting at: column 10); accepted: one JSON "
                               "object per line")
    assert [p.name for p in store_dir.iterdir() if not p.name.endswith(".lock")] == []


def test_a_store_dir_that_cannot_be_written(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "x"}\n')
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError) as info:
        prepare_store(str(src), ByteTokenizer(), store_dir=blocker / "stores")
    assert str(info.value) == (
        f"dataset.store_dir: cannot build a token store in '{blocker / 'stores'}' (Not a "
        "directory); accepted: a writable folder (default: $TAD_TORCHTUNE_STORE_DIR, else "
        "~/.cache/tad_torchtune/stores)")


def test_a_waiting_rank_gives_up_with_a_clear_message(tmp_path, monkeypatch):
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "x"}\n')
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("TAD_TORCHTUNE_STORE_WAIT_S", "0.3")
    with pytest.raises(TimeoutError) as info:
        prepare_store(str(src), ByteTokenizer(), store_dir=tmp_path / "stores")
    message = str(info.value)
    assert message.startswith(f"dataset: waited 0.3 s for local rank 0 to build the token store "
                              f"'{tmp_path / 'stores'}/c.jsonl-")
    assert message.endswith("'; build it beforehand with `tune run tad_prepare --config CONFIG`, "
                            "or raise TAD_TORCHTUNE_STORE_WAIT_S")
    assert not (tmp_path / "stores").exists()  # waiting ranks write nothing


def test_a_sentencepiece_tokenizer_goes_through_workers(tmp_path, demo_docs):
    """torchtune's llama2 tokenizer (SentencePiece): no batch engine; 2 workers == one process
    == tokenizer.encode, and the fingerprint is stable across loads."""
    import sentencepiece as spm
    from torchtune.models.llama2 import llama2_tokenizer

    from tad_torchtune.data import tokenizer_fingerprint

    (tmp_path / "text.txt").write_text("\n".join(demo_docs[:400]))
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "text.txt"), model_prefix=str(tmp_path / "spm"), vocab_size=500,
        model_type="bpe", character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        minloglevel=2,
    )
    tok = llama2_tokenizer(str(tmp_path / "spm.model"))
    assert batch_encoder(tok) is None
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(llama2_tokenizer(str(tmp_path / "spm.model")))
    src = tmp_path / "c.jsonl"
    docs = demo_docs[:600]
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    files = expand_sources(str(src))
    a = build_store(tmp_path / "w", files, tok, num_workers=2, progress=False)
    b = build_store(tmp_path / "i", files, tok, num_workers=1, progress=False)
    assert _comparable(a) == _comparable(b)
    assert TokenStore.open(a).tokens.tolist() == _flat(encode_all(tok, docs))[0]
    assert json.loads((a / MANIFEST).read_text())["build"]["engine"] == "workers"


def test_a_build_removes_what_killed_builds_of_other_stores_left(tmp_path, demo_tok, demo_docs):
    """A build killed midway leaves its temporary folder; the corpus is then touched, so the
    next build is of another store (another key): it removes the abandoned folder, but not the
    folder of a build that holds its store's lock (one running now)."""
    import fcntl
    import os

    from tad_torchtune.files import temporary_path

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in demo_docs[:20]))
    stores = tmp_path / "stores"
    stores.mkdir()
    abandoned = temporary_path(stores / "c.jsonl-0123456789abcdef")  # a killed build's
    running = temporary_path(stores / "d.jsonl-fedcba9876543210")  # a build going on
    for folder in (abandoned, running):
        folder.mkdir()
        (folder / "tokens.bin").write_bytes(b"\0" * 64)
        (stores / f".{folder.name[5:].rsplit('-', 2)[0]}.lock").touch()
    with open(stores / ".d.jsonl-fedcba9876543210.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        os.utime(corpus, (1e9, 1e9))  # touched: another key
        store, _ = prepare_store(str(corpus), demo_tok, store_dir=stores, progress=False)
    assert not abandoned.exists() and running.exists()
    assert [p.name for p in stores.iterdir() if not p.name.startswith(".")] == [store.path.name]


def test_a_large_text_file_is_told_to_take_memory(tmp_path, monkeypatch, capsys):
    """A .txt file is one document, tokenized whole (about 120x its size in memory): above
    LARGE_TEXT_FILE a build says so, naming the file; JSON Lines of the same size do not."""
    from tad_torchtune.data import prepare

    monkeypatch.setattr(prepare, "LARGE_TEXT_FILE", 1000)
    big, rows = tmp_path / "book.txt", tmp_path / "rows.jsonl"
    big.write_text("some words of a book. " * 100)
    rows.write_text('{"text": "some words of a book."}\n' * 100)
    prepare_store(str(big), ByteTokenizer(), store_dir=tmp_path / "s", progress=False)
    prepare_store(str(rows), ByteTokenizer(), store_dir=tmp_path / "s", progress=False)
    warnings = [x for x in capsys.readouterr().err.splitlines() if "warning" in x]
    assert warnings == [
        f"tad_torchtune: warning: dataset.source: {str(big)!r} is one document of 0 MiB, "
        f"tokenized whole: about 0.0 GiB of memory; JSON Lines or parquet with a document per "
        f"row are tokenized in bounded memory"]


def test_a_touched_or_copied_corpus_links_the_store_of_its_contents(tmp_path, demo_tok,
                                                                     demo_docs, capsys):
    """The key is stat-based (start-up reads nothing), so a corpus touched, or copied with its
    times to another folder, has another key. Its files' SHA-256 are those a store records: the
    store is linked under the new key (the same tokens, no second tokenization, no second copy
    on disk), the content fingerprint unchanged; a file of the same size but other bytes is
    tokenized anew."""
    import os
    import shutil

    corpus = tmp_path / "a" / "c.jsonl"
    corpus.parent.mkdir()
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in demo_docs[:30]))
    stores = tmp_path / "stores"
    first, built = prepare_store(str(corpus), demo_tok, store_dir=stores, progress=False)
    assert built
    capsys.readouterr()
    os.utime(corpus, (1e9, 1e9))  # touched
    copy = tmp_path / "b" / "c.jsonl"
    copy.parent.mkdir()
    shutil.copy2(corpus, copy)  # copied with its times, elsewhere
    for path in (corpus, copy):
        store, built = prepare_store(str(path), demo_tok, store_dir=stores, progress=False)
        err = capsys.readouterr().err
        assert not built and "building" not in err and "linked, not tokenized again" in err
        assert store.path != first.path and store.fingerprint == first.fingerprint
        assert np.array_equal(np.asarray(store.tokens), np.asarray(first.tokens))
        assert os.stat(store.path / TOKENS).st_ino == os.stat(first.path / TOKENS).st_ino
        assert store.manifest["sources"][0]["path"] == str(path)
    # found by its key from now on: nothing hashed, nothing said
    prepare_store(str(copy), demo_tok, store_dir=stores, progress=False)
    assert capsys.readouterr().err == ""
    # same size, other bytes: a build
    text = corpus.read_text()
    at = text.index("e", 20)  # inside the first document's text
    corpus.write_text(text[:at] + "o" + text[at + 1:])
    _, built = prepare_store(str(corpus), demo_tok, store_dir=stores, progress=False)
    assert built and "linked" not in capsys.readouterr().err


def test_empty_parts_of_a_folder_are_left_out_with_a_note(tmp_path, capsys):
    """Spark writes a part per partition, an empty one for an empty partition (0 bytes in JSON
    lines, 0 rows in parquet): among several files they are left out with a note line, and the
    store holds the other files' tokens (before, the build stopped at the first, after
    tokenizing the files before it); one empty file alone, or only empty files, stay an error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tad_torchtune.data import CorpusError

    docs = ["first document", "second one", "a third"]
    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "part-00000.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    (folder / "part-00001.jsonl").write_text("")
    (folder / "part-00002.jsonl").write_text("\n\n")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), folder / "part-00003.parquet")
    store, built = prepare_store(str(folder), ByteTokenizer(), store_dir=tmp_path / "s",
                                 progress=False)
    assert built and store.num_documents == 3
    alone, _ = prepare_store(str(folder / "part-00000.jsonl"), ByteTokenizer(),
                             store_dir=tmp_path / "s", progress=False)
    assert store.tokens.tolist() == alone.tokens.tolist()
    notes = [line for line in capsys.readouterr().err.splitlines() if "left out" in line]
    assert notes == [
        f"tad_torchtune: dataset.source: {str(folder / 'part-00001.jsonl')!r} is empty (0 bytes): "
        "left out",
        f"tad_torchtune: dataset.source: {str(folder / 'part-00002.jsonl')!r} holds no document "
        "(only blank lines): left out",
        f"tad_torchtune: dataset.source: {str(folder / 'part-00003.parquet')!r} holds no "
        "document (0 rows): left out"]
    (folder / "part-00000.jsonl").unlink()
    with pytest.raises(CorpusError, match=r"part-00003.parquet' holds no document \(0 rows\)"):
        prepare_store(str(folder), ByteTokenizer(), store_dir=tmp_path / "s", progress=False)
    with pytest.raises(CorpusError, match=r"part-00001.jsonl' is empty \(0 bytes\)"):
        prepare_store(str(folder / "part-00001.jsonl"), ByteTokenizer(),
                      store_dir=tmp_path / "s", progress=False)


def test_a_corpus_is_hashed_once_however_many_stores_have_its_sizes(tmp_path, demo_tok,
                                                                     demo_docs, monkeypatch):
    """Looking for a store of the same contents hashes each file once, whatever the number of
    stores of the same sizes (before: once per such store, so a start-up read the corpus again
    for every store kept of an earlier version of it)."""
    from tad_torchtune.data import prepare

    corpus = tmp_path / "c.jsonl"
    text = "".join(json.dumps({"text": d}) + "\n" for d in demo_docs[:20])
    stores = tmp_path / "stores"
    at = text.index("e", 20)  # inside the first document's text
    for letter in "abcd":  # four versions of one size, each built
        corpus.write_text(text[:at] + letter + text[at + 1:])
        assert prepare_store(str(corpus), demo_tok, store_dir=stores, progress=False)[1]
    hashed = []
    real = prepare.hash_file
    monkeypatch.setattr(prepare, "hash_file", lambda path: hashed.append(path) or real(path))
    corpus.write_text(text[:at] + "f" + text[at + 1:])  # a fifth: no store has its contents
    assert prepare_store(str(corpus), demo_tok, store_dir=stores, progress=False)[1]
    assert hashed == [corpus]


def test_the_progress_bar_counts_the_sources_bytes_to_the_end(tmp_path, demo_tok, demo_docs,
                                                              monkeypatch, capsys):
    """The bar's total is the source files' bytes (so it shows a share and the time left),
    each batch moves it to the bytes read so far, and it ends at every byte with the tokens
    written and their rate (before: a count of tokens with no total)."""
    from tqdm import tqdm

    from tad_torchtune.data import prepare, sources

    files = _two_files(tmp_path / "corpus", demo_docs)
    total = sum(f.size for f in files)
    monkeypatch.setitem(prepare.BATCH_CHARS, "batch", 2000)
    monkeypatch.setattr(sources, "_READ_SIZE", 4096)  # files are read 1 MiB at a time
    batches = [b for b in prepare._batches(files, column="text", where="dataset",
                                           batch_chars=2000) if isinstance(b, prepare._Batch)]
    read = [b.bytes_read for b in batches]
    assert len(read) > 4 and read == sorted(read) and read[-1] == total
    assert read[0] < files[0].size < read[-2]  # moved within the files, not file by file
    path = build_store(tmp_path / "store", files, demo_tok, progress=True)
    last = capsys.readouterr().err.split("\r")[-1]
    tokens = TokenStore.open(path).num_tokens
    assert "100%" in last and f"{prepare._count(tokens)} tokens" in last, last
    size = tqdm.format_sizeof(total, divisor=1024)
    assert "tokens/s, file 2/2" in last and f"| {size}/{size} [" in last, last


class _Interrupted(ByteTokenizer):
    """ByteTokenizer that records what it encodes and, while ``stop`` is set, is interrupted
    (Ctrl-C) at a document holding "STOP"."""

    stop = False
    seen: list = []

    def encode(self, text, add_bos=True, add_eos=True):
        if _Interrupted.stop and "STOP" in text:
            raise KeyboardInterrupt
        _Interrupted.seen.append(text)
        return super().encode(text, add_bos, add_eos)


def test_an_interrupted_build_goes_on_from_the_files_it_finished(tmp_path, monkeypatch, capsys):
    """A build interrupted in its third of four files keeps, from its last checkpoint, the two
    it finished: the next build reads only the others and publishes the bytes of a build that
    ran through (before, it started over: 75 s lost at 5M of 50M tokens)."""
    from tad_torchtune.data import prepare

    monkeypatch.setattr(prepare, "CHECKPOINT_EVERY_S", 0.0)  # at every file's end
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        docs = [f"document {j} of part {i}" + (" STOP" if (i, j) == (2, 5) else "")
                for j in range(40)]
        (corpus / f"part-{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n"
                                                        for d in docs))
    tok = _Interrupted()
    monkeypatch.setattr(_Interrupted, "stop", True)
    with pytest.raises(KeyboardInterrupt):
        prepare_store(str(corpus), tok, store_dir=tmp_path / "s", num_workers=1, progress=False)
    (left,) = (tmp_path / "s").glob(".tmp-*")  # kept, with its checkpoint
    assert json.loads((left / "progress.json").read_text())["num_documents"] == 80
    monkeypatch.setattr(_Interrupted, "stop", False)
    monkeypatch.setattr(_Interrupted, "seen", [])
    capsys.readouterr()
    store, built = prepare_store(str(corpus), tok, store_dir=tmp_path / "s", num_workers=1,
                                 progress=True)
    assert built and ("tad_torchtune: going on from an interrupted build: 2 of 4 file(s), "
                      f"{80 * 2 + sum(len(d) for d in _docs_of(corpus, 2)):,} tokens, kept"
                      ) in capsys.readouterr().err
    parts = {text.split(" of part ")[1] for text in _Interrupted.seen if " of part " in text}
    assert parts == {"2", "2 STOP", "3"}  # the files it had not finished, alone
    assert not list((tmp_path / "s").glob(".tmp-*"))
    ref, _ = prepare_store(str(corpus), tok, store_dir=tmp_path / "ref", num_workers=1,
                           progress=False)
    assert _comparable(store.path) == _comparable(ref.path)
    assert store.fingerprint == ref.fingerprint and "progress.json" not in os.listdir(store.path)


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "parquet"])
def test_an_interrupted_build_goes_on_from_within_the_file_it_was_in(tmp_path, monkeypatch,
                                                                      capsys, kind):
    """A corpus in one file, interrupted at its 150th of 200 documents: the next build keeps the
    documents its last checkpoint counted and tokenizes only those after them (before, a file
    was kept whole or not at all, so a corpus of one big file started over), to the bytes of a
    build that ran through; the file's hash is still that of all of its bytes."""
    from tad_torchtune.data import prepare

    monkeypatch.setattr(prepare, "CHECKPOINT_EVERY_S", 0.0)  # between every two batches
    monkeypatch.setattr(prepare, "BATCH_CHARS", {**prepare.BATCH_CHARS, "inline": 300})
    docs = [f"document {j} of the only file" + (" STOP" if j == 149 else "") for j in range(200)]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    path = corpus / f"all.{kind}"
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": docs}), path, row_group_size=16)
    else:
        lines = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
        path.write_bytes(gzip.compress(lines) if kind.endswith(".gz") else lines)
    tok = _Interrupted()
    monkeypatch.setattr(_Interrupted, "stop", True)
    monkeypatch.setattr(_Interrupted, "seen", [])
    with pytest.raises(KeyboardInterrupt):
        prepare_store(str(corpus), tok, store_dir=tmp_path / "s", num_workers=1, progress=False)
    (left,) = (tmp_path / "s").glob(".tmp-*")
    progress = json.loads((left / "progress.json").read_text())
    kept = progress["header"]["in_file"]["num_documents"]
    assert progress["sources"] == [] and kept == progress["num_documents"]
    assert 100 < kept < 150 and _ours(_Interrupted.seen)[:kept] == docs[:kept]
    monkeypatch.setattr(_Interrupted, "stop", False)
    monkeypatch.setattr(_Interrupted, "seen", [])
    capsys.readouterr()
    store, built = prepare_store(str(corpus), tok, store_dir=tmp_path / "s", num_workers=1,
                                 progress=False)
    assert built and (f"going on from an interrupted build: 0 of 1 file(s) and {kept:,} "
                      f"document(s) of the next, {progress['num_tokens']:,} tokens, kept"
                      ) in capsys.readouterr().err
    assert _ours(_Interrupted.seen) == docs[kept:]  # the kept ones were not tokenized again
    ref, _ = prepare_store(str(corpus), tok, store_dir=tmp_path / "ref", num_workers=1,
                           progress=False)
    assert _comparable(store.path) == _comparable(ref.path)
    assert store.fingerprint == ref.fingerprint
    (source,) = store.manifest["sources"]
    assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert source["num_documents"] == 200 and not list((tmp_path / "s").glob(".tmp-*"))


def _ours(seen):
    """The documents among the texts a tokenizer encoded (not its fingerprint's probe)."""
    return [text for text in seen if "of the only file" in text]


def _docs_of(corpus, files):
    return [json.loads(line)["text"] for i in range(files)
            for line in (corpus / f"part-{i}.jsonl").read_text().splitlines()]


def _interrupted_build(tmp_path, monkeypatch, name="corpus"):
    """A corpus of 4 files whose build was interrupted in its third: (corpus, store_dir, the
    build's kept folder)."""
    from tad_torchtune.data import prepare

    monkeypatch.setattr(prepare, "CHECKPOINT_EVERY_S", 0.0)
    corpus = tmp_path / name
    corpus.mkdir()
    for i in range(4):
        (corpus / f"part-{i}.jsonl").write_text("".join(
            json.dumps({"text": f"document {j} of {name} {i}" + (" STOP" if (i, j) == (2, 5)
                                                                   else "")}) + "\n"
            for j in range(40)))
    monkeypatch.setattr(_Interrupted, "stop", True)
    with pytest.raises(KeyboardInterrupt):
        prepare_store(str(corpus), _Interrupted(), store_dir=tmp_path / "s", num_workers=1,
                      progress=False)
    monkeypatch.setattr(_Interrupted, "stop", False)
    (kept,) = [p for p in (tmp_path / "s").glob(".tmp-*") if (p / "progress.json").is_file()
               and name in json.loads((p / "progress.json").read_text())["sources"][0]["path"]]
    return corpus, tmp_path / "s", kept


def test_an_interrupted_build_is_gone_on_from_only_where_that_is_safe(tmp_path, monkeypatch,
                                                                       capsys):
    """The adversarial test's cases: without file locks two builders went on from one folder
    (a damaged store); a folder this process cannot write blocked every build; a checkpoint's
    temporary file a kill left was published in the store; another store's build removed the
    checkpoint (younger than KEEP_INTERRUPTED_S, it stays; older, it goes)."""
    import errno
    import fcntl

    from tad_torchtune.data import store as store_module

    corpus, stores, kept = _interrupted_build(tmp_path, monkeypatch)
    (kept / ".tmp-progress.json-1-abcd").write_text("{}")  # a kill inside checkpoint()
    # another corpus built beside it: the checkpoint stays
    other, _, other_kept = _interrupted_build(tmp_path, monkeypatch, name="other")
    assert kept.is_dir() and other_kept.is_dir()
    os.utime(other_kept / "progress.json", (1, 1))  # long ago: removed by the next build
    capsys.readouterr()
    store, _ = prepare_store(str(corpus), _Interrupted(), store_dir=stores, num_workers=1,
                             progress=False)
    assert "going on from an interrupted build: 2 of 4" in capsys.readouterr().err
    assert sorted(os.listdir(store.path)) == ["manifest.json", "offsets.bin", "tokens.bin"]
    assert not other_kept.exists()
    # no file locks: a fresh build, not one going on from a folder another builder may use
    shutil_rm(store.path)
    corpus2, _, kept2 = _interrupted_build(tmp_path, monkeypatch, name="third")

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "no locks")

    with monkeypatch.context() as m:
        m.setattr(fcntl, "flock", no_locks)
        prepare_store(str(corpus2), _Interrupted(), store_dir=stores, num_workers=1,
                      progress=False)
    assert "going on" not in capsys.readouterr().err
    # a folder this process may not write: a fresh build in a new one
    corpus3, _, kept3 = _interrupted_build(tmp_path, monkeypatch, name="fourth")
    access = os.access
    with monkeypatch.context() as m:
        m.setattr(store_module.os, "access",
                  lambda path, mode: not str(path).startswith(str(kept3)) and access(path, mode))
        ref, built = prepare_store(str(corpus3), _Interrupted(), store_dir=stores,
                                   num_workers=1, progress=False)
    assert built and "going on" not in capsys.readouterr().err
    assert ref.num_documents == 160


def shutil_rm(path):
    import shutil

    shutil.rmtree(path)


def test_a_tokenizer_worker_leaves_ctrl_c_to_its_parent():
    """Ctrl-C reaches the process group: a worker interrupted while holding the call queue's
    lock left the parent's shutdown waiting for good (1 in 12 interruptions hung)."""
    import signal

    from tad_torchtune.data.prepare import _init_worker

    before = signal.getsignal(signal.SIGINT)
    try:
        _init_worker(ByteTokenizer())
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_build_goes_on_within_a_file_only_from_documents_and_counts_that_agree(tmp_path,
                                                                                  monkeypatch):
    """A file rewritten with its size and time kept (its key unchanged) after an interruption
    within it: the kept documents are of the old text, so the build says so and starts over;
    a progress.json whose counts disagree is not gone on from (it published a wrong store)."""
    from tad_torchtune.data import prepare

    monkeypatch.setattr(prepare, "CHECKPOINT_EVERY_S", 0.0)
    monkeypatch.setattr(prepare, "BATCH_CHARS", {**prepare.BATCH_CHARS, "inline": 300})
    docs = [f"document {j} of the only file" + (" STOP" if j == 149 else "") for j in range(200)]
    path = tmp_path / "corpus" / "all.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))

    def interrupted(stores):
        monkeypatch.setattr(_Interrupted, "stop", True)
        with pytest.raises(KeyboardInterrupt):
            prepare_store(str(path), _Interrupted(), store_dir=stores, num_workers=1,
                          progress=False)
        monkeypatch.setattr(_Interrupted, "stop", False)
        (left,) = stores.glob(".tmp-*")
        return left / "progress.json"

    interrupted(tmp_path / "s")
    st = path.stat()
    path.write_text(path.read_text().replace("document 3 ", "dokument 3 "))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(StoreError, match="changed since the interrupted build"):
        prepare_store(str(path), _Interrupted(), store_dir=tmp_path / "s", num_workers=1,
                      progress=False)
    store, _ = prepare_store(str(path), _Interrupted(), store_dir=tmp_path / "s", num_workers=1,
                             progress=False)
    ref, _ = prepare_store(str(path), _Interrupted(), store_dir=tmp_path / "ref", num_workers=1,
                           progress=False)
    assert _comparable(store.path) == _comparable(ref.path)
    progress = interrupted(tmp_path / "t")
    edited = json.loads(progress.read_text())
    edited["header"]["in_file"]["num_documents"] -= 1
    progress.write_text(json.dumps(edited))
    store, _ = prepare_store(str(path), _Interrupted(), store_dir=tmp_path / "t", num_workers=1,
                             progress=False)
    assert _comparable(store.path) == _comparable(ref.path)
    assert not list((tmp_path / "t").glob(".tmp-*"))  # the refused checkpoint is not kept


def test_a_build_killed_as_it_publishes_goes_on_from_its_last_checkpoint(tmp_path, monkeypatch):
    """Stopped between writing its manifest and the rename that publishes it, a build keeps its
    checkpoint (before, publish removed it first, so the whole build was lost): the next one
    tokenizes nothing again and publishes the same bytes."""
    from tad_torchtune.data import prepare
    from tad_torchtune.data import store as store_module

    monkeypatch.setattr(prepare, "CHECKPOINT_EVERY_S", 0.0)
    monkeypatch.setattr(prepare, "BATCH_CHARS", {**prepare.BATCH_CHARS, "inline": 300})
    docs = [f"document {j} of the only file" for j in range(60)]
    path = tmp_path / "corpus" / "all.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    publish = store_module.publish_dir

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(store_module, "publish_dir", killed)
        with pytest.raises(KeyboardInterrupt):
            prepare_store(str(path), _Interrupted(), store_dir=tmp_path / "s", num_workers=1,
                          progress=False)
    assert store_module.publish_dir is publish
    (left,) = (tmp_path / "s").glob(".tmp-*")
    assert (left / "progress.json").is_file()
    monkeypatch.setattr(_Interrupted, "seen", [])
    store, built = prepare_store(str(path), _Interrupted(), store_dir=tmp_path / "s",
                                 num_workers=1, progress=False)
    assert built and _ours(_Interrupted.seen) == []  # nothing tokenized again
    ref, _ = prepare_store(str(path), _Interrupted(), store_dir=tmp_path / "ref", num_workers=1,
                           progress=False)
    assert _comparable(store.path) == _comparable(ref.path)
    assert sorted(os.listdir(store.path)) == ["manifest.json", "offsets.bin", "tokens.bin"]
