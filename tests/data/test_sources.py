"""Streaming corpus readers: the documents they yield, the hash they compute, their errors."""

import gzip
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tad_torchtune.data.sources import CorpusError, SourceFile, expand_sources, iter_documents
from tests.data.reference import DEMO_CORPUS, read_documents


def documents(path, **kw):
    return list(iter_documents(SourceFile.stat(path), **kw))


def test_demo_corpus_streamed_equals_read_at_once_and_hash_is_the_files():
    digest = hashlib.sha256()
    docs = list(iter_documents(SourceFile.stat(DEMO_CORPUS), digest=digest))
    assert docs == read_documents(DEMO_CORPUS) and len(docs) == 2497
    assert digest.hexdigest() == hashlib.sha256(DEMO_CORPUS.read_bytes()).hexdigest()


def test_formats(tmp_path):
    rows = [{"text": "first doc"}, {"text": "second\ndoc", "id": 2}, {"text": ""}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n  \n")
    with gzip.open(tmp_path / "b.json.gz", "wt") as f:
        f.write("\n".join(json.dumps({"body": r["text"]}) for r in rows))
    (tmp_path / "c.txt").write_text("line one\n\nline two\n")
    # several row groups and record batches: parquet is streamed, not read whole
    table = pa.table({"text": [f"row {i}" for i in range(10_000)], "n": list(range(10_000))})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=3000)
    assert documents(tmp_path / "a.jsonl") == ["first doc", "second\ndoc", ""]
    assert documents(tmp_path / "b.json.gz", column="body") == ["first doc", "second\ndoc", ""]
    assert documents(tmp_path / "c.txt") == ["line one\n\nline two\n"]
    assert documents(tmp_path / "d.parquet") == [f"row {i}" for i in range(10_000)]
    digest = hashlib.sha256()
    list(iter_documents(SourceFile.stat(tmp_path / "d.parquet"), digest=digest))
    assert digest.hexdigest() == hashlib.sha256((tmp_path / "d.parquet").read_bytes()).hexdigest()


def test_expand_sources_order_folder_glob_list(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.txt"):
        (tmp_path / name).write_text('{"text": "x"}\n')
    files = expand_sources(str(tmp_path))
    assert [f.path.name for f in files] == ["a.jsonl", "b.jsonl", "c.txt"]
    assert all(f.path.is_absolute() and f.size == 14 for f in files)
    assert [f.path.name for f in expand_sources(str(tmp_path / "*.jsonl"))] == ["a.jsonl", "b.jsonl"]
    assert [f.path.name for f in expand_sources([str(tmp_path / "c.txt"), str(tmp_path / "a.jsonl")])] \
        == ["c.txt", "a.jsonl"]
    assert expand_sources("pkg://demo/jargon.jsonl.gz")[0].path == DEMO_CORPUS.resolve()


def test_a_folder_leaves_out_hidden_files_and_sparks_markers(tmp_path):
    """A folder written by Spark or Hadoop holds ``_SUCCESS`` and ``.crc`` checksums beside its
    parts (refused as unsupported files before); they are not documents."""
    for name in ("part-00000.jsonl", "part-00001.jsonl", "_SUCCESS", ".part-00000.jsonl.crc",
                 "_metadata"):
        (tmp_path / name).write_text('{"text": "x"}\n')
    assert [f.path.name for f in expand_sources(str(tmp_path))] == ["part-00000.jsonl",
                                                                    "part-00001.jsonl"]
    # subfolders (Spark's partitions) are read, by path; Spark's work folders are not
    for sub in ("year=2024", "year=2025", "_temporary/0"):
        (tmp_path / sub).mkdir(parents=True)
        (tmp_path / sub / "part-00000.jsonl").write_text('{"text": "x"}\n')
    assert [str(f.path.relative_to(tmp_path.resolve())) for f in expand_sources(str(tmp_path))
            ] == ["part-00000.jsonl", "part-00001.jsonl", "year=2024/part-00000.jsonl",
                  "year=2025/part-00000.jsonl"]
    # a Hugging Face datasets folder (save_to_disk) is named as such, not read as files
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(CorpusError) as err:
        expand_sources(str(saved))
    assert str(err.value) == (
        f"dataset.source: {str(saved)!r} is a Hugging Face datasets folder (save_to_disk), "
        "which is not read; accepted: its rows written as files, e.g. Dataset.to_parquet or "
        "Dataset.to_json (JSON lines)")
    only_markers = tmp_path / "markers"
    only_markers.mkdir()
    (only_markers / "_SUCCESS").write_text("")
    with pytest.raises(CorpusError, match="holds no file"):
        expand_sources(str(only_markers))


def test_errors_name_the_key_the_file_the_line_and_what_is_accepted(tmp_path):
    def error(path, **kw):
        with pytest.raises(CorpusError) as info:
            documents(path, **kw)
        return str(info.value).replace(str(tmp_path), "T")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": "cut\n')
    assert error(bad) == ("dataset.source: 'T/bad.jsonl' line 3 is not JSON (Unterminated "
                          "string starting at: column 10); accepted: one JSON object per line")
    bad.write_text('{"text": "ok"}\n["text"]\n')
    assert error(bad, where="validation_dataset") == (
        "validation_dataset.source: 'T/bad.jsonl' line 2 is a JSON array, not an object; "
        "accepted: one JSON object per line with the text in 'text'")
    bad.write_text('{"text": "ok"}\n{"body": "x", "id": 1}\n')
    assert error(bad) == ("dataset.column: 'T/bad.jsonl' line 2 has no field 'text' (fields: "
                          "['body', 'id']); accepted: a field every line has")
    bad.write_text('{"text": 3}\n')
    assert error(bad) == ("dataset.column: 'T/bad.jsonl' line 1: field 'text' is a JSON number, "
                          "not a string; accepted: a field holding the document's text")
    bad.write_bytes(b'{"text": "caf\xe9"}\n')
    assert error(bad) == ("dataset.source: 'T/bad.jsonl' line 1 is not UTF-8 (byte 14 of the line); "
                          "accepted: UTF-8 JSON lines")
    bad.write_text('{"text": "ok"}\n{"text": "bad \\ud800 surrogate"}\n')  # JSON, not text
    assert error(bad) == ("dataset.source: 'T/bad.jsonl' line 2: field 'text' holds '\\ud800', "
                          "not Unicode text (surrogates not allowed); accepted: text that "
                          "encodes as UTF-8")
    bad.write_text("\n \n")
    assert error(bad) == ("dataset.source: 'T/bad.jsonl' holds no document (only blank lines); "
                          "accepted: a file with at least one document")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert error(empty) == ("dataset.source: 'T/empty.txt' is empty (0 bytes); accepted: a file "
                            "with at least one document")
    not_gz = tmp_path / "x.jsonl.gz"
    not_gz.write_text('{"text": "plain"}\n')
    assert error(not_gz).startswith("dataset.source: 'T/x.jsonl.gz' is not a valid gzip file (")
    assert error(not_gz).endswith("); accepted: a gzip-compressed text or JSON lines file")

    pq.write_table(pa.table({"body": ["a"], "n": [1]}), tmp_path / "p.parquet")
    assert error(tmp_path / "p.parquet") == (
        "dataset.column: 'T/p.parquet' has no column 'text' (columns: ['body', 'n']); "
        "accepted: one of its columns")
    assert error(tmp_path / "p.parquet", column="n") == (
        "dataset.column: column 'n' of 'T/p.parquet' is int64, not a string column; accepted: "
        "a column holding the documents' text")
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "p.parquet")
    assert error(tmp_path / "p.parquet") == (
        "dataset.column: 'T/p.parquet' row 1 of column 'text' is null; accepted: a string in "
        "every row")
    (tmp_path / "q.parquet").write_text("not parquet")
    assert error(tmp_path / "q.parquet").startswith("dataset.source: 'T/q.parquet' is not a parquet file (")


def test_expand_errors(tmp_path):
    def error(source):
        with pytest.raises(CorpusError) as info:
            expand_sources(source)
        return str(info.value).replace(str(tmp_path), "T")

    assert error(str(tmp_path / "missing.jsonl")) == (
        "dataset.source: no file matches 'T/missing.jsonl'; accepted: an existing file, a "
        "folder, a glob, or a list of them")
    assert error(str(tmp_path / "*.parquet")) == (
        "dataset.source: no file matches 'T/*.parquet'; accepted: an existing file, a folder, "
        "a glob, or a list of them")
    (tmp_path / "sub").mkdir()
    assert error(str(tmp_path / "sub")) == (
        "dataset.source: the folder 'T/sub' holds no file; accepted: a folder of .txt, .jsonl, "
        ".json, .parquet (optionally .gz, except parquet) files")
    (tmp_path / "notes.md").write_text("x")
    assert error([str(tmp_path / "notes.md")]) == (
        "dataset.source: unsupported file 'T/notes.md'; accepted: .txt, .jsonl, .json, .parquet "
        "(optionally .gz, except parquet)")
    assert error([]) == ("dataset.source: an empty list; accepted: a file, a folder, a glob, or "
                         "a list of them")


def test_a_file_this_user_cannot_read_is_one_line_naming_the_key(tmp_path, monkeypatch):
    """A source file without read permission (a shared corpus of another user) named with its
    key, before any read (before: Python's "[Errno 13] Permission denied", naming no key). The
    permission is simulated: the tests may run as root, whom every file lets read."""
    import os

    for name in ("c.jsonl", "c.parquet"):
        path = tmp_path / name
        if name.endswith(".jsonl"):
            path.write_text('{"text": "x"}\n')
        else:
            pq.write_table(pa.table({"text": ["x"]}), path)
        monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != path)
        with pytest.raises(CorpusError) as err:
            list(iter_documents(SourceFile.stat(path), where="validation_dataset"))
        assert str(err.value) == (f"validation_dataset.source: {str(path)!r} cannot be read (no "
                                  "read permission for this user); accepted: a readable file")
        monkeypatch.undo()
        assert list(iter_documents(SourceFile.stat(path))) == ["x"]
