"""Corpus files, read as a stream of documents: never more than one document in memory (a
``.txt`` file is one document, read whole: a large corpus belongs in JSON Lines or parquet).

A source is a file, a folder (its files and its subfolders' (Spark's partitions), sorted by
path; a path with a part starting with ``.`` or ``_`` left out: hidden files and the markers,
checksums and work folders Spark and Hadoop write beside their parts, such as ``_SUCCESS``,
``.part-0.parquet.crc`` and ``_temporary/``; a Hugging Face ``datasets`` folder is refused,
its Arrow files being ``datasets``' own), a glob, or a list of them; among several files, one
that holds no document (Spark's part of an empty partition) is left out with a note. The format
follows the file name:

- ``.jsonl`` / ``.json``: one JSON object per line, the document in field ``column``; blank lines
  are skipped;
- ``.parquet``: one document per row of the string column ``column``, read a record batch at a
  time;
- ``.txt`` / ``.text``: the whole file is one document;
- a trailing ``.gz`` on a text or JSON name: gzip, decompressed as it is read.

The raw bytes of every file are hashed (SHA-256) while they are read, for the store's manifest.
Every error a user can cause is a ``CorpusError`` (a ``ValueError``) with one line naming the
config key, the file (and line or row), the value and what is accepted.
"""

import gzip
import hashlib
import io
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

JSON_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt", ".text")
ACCEPTED_FORMATS = ".txt, .jsonl, .json, .parquet (optionally .gz, except parquet)"
_ASSETS = Path(__file__).parents[1] / "assets"
_READ_SIZE = 1 << 20
_PARQUET_BATCH_ROWS = 4096
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "boolean", type(None): "null"}


class CorpusError(ValueError):
    """A corpus file that cannot be read as documents (names the key, file and what is accepted)."""


class NoDocument(CorpusError):
    """A corpus file that holds no document (empty, blank lines, no row, no text)."""


def resolve_asset(path: str) -> str:
    """``pkg://NAME`` -> the file NAME inside ``tad_torchtune/assets``; other paths unchanged."""
    if path.startswith("pkg://"):
        return str(_ASSETS / path[len("pkg://"):])
    return path


@dataclass(frozen=True)
class SourceFile:
    """A corpus file as found at start-up: its absolute path, size and modification time."""

    path: Path
    size: int
    mtime_ns: int

    @classmethod
    def stat(cls, path: Path) -> "SourceFile":
        st = path.stat()
        return cls(path=path, size=st.st_size, mtime_ns=st.st_mtime_ns)


def document_format(path: Path, *, where: str = "dataset") -> tuple[str, bool]:
    """The format of ``path`` (``"json"``, ``"parquet"`` or ``"text"``) and whether it is gzip.

    Raises:
        CorpusError: for a name none of the formats accepts.
    """
    name = path.name.lower()
    gz = name.endswith(".gz")
    stem = name[:-3] if gz else name
    if stem.endswith(JSON_SUFFIXES):
        return "json", gz
    if stem.endswith(TEXT_SUFFIXES):
        return "text", gz
    if stem.endswith(".parquet") and not gz:
        return "parquet", False
    raise CorpusError(
        f"{where}.source: unsupported file {str(path)!r}; accepted: {ACCEPTED_FORMATS}"
    )


def expand_sources(source: str | os.PathLike | Sequence[str], *, where: str = "dataset") -> list[SourceFile]:
    """The files named by ``source``, in order, with ``pkg://`` resolved and paths made absolute.

    Args:
        source: a file, a folder (its files and its subfolders', sorted by path), a glob, or a
            list of them.
        where: the config key of the dataset, for error messages.

    Returns:
        One ``SourceFile`` per file (stat only: nothing is read).

    Raises:
        CorpusError: a name that matches no file, an empty folder, an unsupported file name.
    """
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not items:
        raise CorpusError(f"{where}.source: an empty list; accepted: a file, a folder, a glob, "
                          "or a list of them")
    paths: list[Path] = []
    for item in items:
        p = Path(resolve_asset(str(item))).expanduser()
        if p.is_dir():
            if any((p / name).is_file() for name in DATASETS_FOLDER_FILES):
                raise CorpusError(
                    f"{where}.source: {str(item)!r} is a Hugging Face datasets folder "
                    f"(save_to_disk), which is not read; accepted: its rows written as files, "
                    f"e.g. Dataset.to_parquet or Dataset.to_json (JSON lines)")
            found = _folder_files(p)
            if not found:
                raise CorpusError(f"{where}.source: the folder {str(item)!r} holds no file; "
                                  f"accepted: a folder of {ACCEPTED_FORMATS} files")
            paths.extend(found)
        elif p.exists():
            paths.append(p)
        else:
            matches = sorted(q for q in p.parent.glob(p.name) if q.is_file())
            if not matches:
                raise CorpusError(f"{where}.source: no file matches {str(item)!r}; accepted: an "
                                  "existing file, a folder, a glob, or a list of them")
            paths.extend(matches)
    files = [SourceFile.stat(p.resolve()) for p in paths]
    for f in files:
        document_format(f.path, where=where)
    return files


#: files that mark a Hugging Face ``datasets`` folder (``save_to_disk``: Arrow files of its own)
DATASETS_FOLDER_FILES = ("dataset_dict.json", "state.json")


def _folder_files(folder: Path) -> list[Path]:
    """The files of ``folder`` and of its subfolders (Spark's partitions, ``year=2024/``),
    sorted by their path within it; those whose path has a part starting with "." or "_"
    (``_SUCCESS``, ``_temporary/``, ``.crc`` files) left out."""
    return sorted(q for q in folder.rglob("*") if q.is_file() and not any(
        part.startswith((".", "_")) for part in q.relative_to(folder).parts))


class _HashingReader(io.RawIOBase):
    """A raw binary file whose bytes feed ``digest`` as they are read."""

    def __init__(self, raw: io.RawIOBase, digest: Any) -> None:
        super().__init__()
        self._raw = raw
        self._digest = digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._raw.readinto(buffer)
        if n:
            self._digest.update(memoryview(buffer)[:n])
        return n


def iter_documents(file: SourceFile, *, column: str = "text", where: str = "dataset",
                   digest: Any = None) -> Iterator[str]:
    """The documents of one file, streamed.

    Args:
        file: the file (``expand_sources``).
        column: field of JSON lines / column of parquet files holding the text.
        where: the config key of the dataset, for error messages.
        digest: a ``hashlib`` object fed with every byte of the file; complete once the iterator
            is exhausted.

    Yields:
        The documents, in file order.

    Raises:
        CorpusError: an empty file, a line that is not UTF-8 or not a JSON object, a line or row
            without ``column`` or whose value is not a string, a file with no document.
    """
    path = file.path
    if file.size == 0:
        raise NoDocument(f"{where}.source: {str(path)!r} is empty (0 bytes); accepted: a file "
                          "with at least one document")
    kind, gz = document_format(path, where=where)
    digest = digest if digest is not None else hashlib.sha256()
    if not os.access(path, os.R_OK):  # before any read: its error would name no key
        raise CorpusError(f"{where}.source: {str(path)!r} cannot be read (no read permission "
                          f"for this user); accepted: a readable file")
    if kind == "parquet":
        yield from _parquet_documents(path, column, where, digest)
        return
    with open(path, "rb", buffering=0) as raw:
        stream: Any = io.BufferedReader(_HashingReader(raw, digest), _READ_SIZE)
        if gz:
            stream = gzip.GzipFile(fileobj=stream, mode="rb")
        try:
            if kind == "json":
                yield from _json_documents(stream, path, column, where)
            else:
                yield _text_document(stream.read(), path, where)
            while stream.read(_READ_SIZE):  # trailing bytes still count in the file's hash
                pass
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise CorpusError(f"{where}.source: {str(path)!r} is not a valid gzip file ({e}); "
                              "accepted: a gzip-compressed text or JSON lines file") from None
        finally:
            stream.close()


def _json_documents(lines: Any, path: Path, column: str, where: str) -> Iterator[str]:
    n_docs = 0
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise CorpusError(f"{where}.source: {str(path)!r} line {lineno} is not UTF-8 "
                              f"(byte {e.start + 1} of the line); accepted: UTF-8 JSON lines") from None
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{where}.source: {str(path)!r} line {lineno} is not JSON "
                              f"({e.msg}: column {e.colno}); accepted: one JSON object per "
                              "line") from None
        if not isinstance(row, dict):
            raise CorpusError(f"{where}.source: {str(path)!r} line {lineno} is a JSON "
                              f"{_JSON_TYPES.get(type(row), type(row).__name__)}, not an object; "
                              f"accepted: one JSON object per line with the text in {column!r}")
        if column not in row:
            raise CorpusError(f"{where}.column: {str(path)!r} line {lineno} has no field "
                              f"{column!r} (fields: {sorted(row)[:8]}); accepted: a field every "
                              "line has")
        text = row[column]
        if not isinstance(text, str):
            raise CorpusError(f"{where}.column: {str(path)!r} line {lineno}: field {column!r} is "
                              f"a JSON {_JSON_TYPES.get(type(text), type(text).__name__)}, not a "
                              "string; accepted: a field holding the document's text")
        if not text.isascii():
            try:  # a lone surrogate ("\ud800") is valid JSON, but no text a tokenizer takes
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise CorpusError(
                    f"{where}.source: {str(path)!r} line {lineno}: field {column!r} holds "
                    f"{text[e.start:e.end]!r}, not Unicode text ({e.reason}); accepted: text "
                    f"that encodes as UTF-8") from None
        n_docs += 1
        yield text
    if n_docs == 0:
        raise NoDocument(f"{where}.source: {str(path)!r} holds no document (only blank lines); "
                          "accepted: a file with at least one document")


def _text_document(data: bytes, path: Path, where: str) -> str:
    if not data:
        raise NoDocument(f"{where}.source: {str(path)!r} holds no text; accepted: a file with "
                          "at least one document")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{where}.source: {str(path)!r} is not UTF-8 (byte {e.start + 1}); "
                          "accepted: UTF-8 text") from None


def hash_file(path: Path, digest: Any = None) -> Any:
    """``digest`` (default: a new SHA-256) fed with every byte of ``path``, in a pass of its own
    and constant memory."""
    digest = digest if digest is not None else hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_SIZE):
            digest.update(chunk)
    return digest


def _parquet_documents(path: Path, column: str, where: str, digest: Any) -> Iterator[str]:
    import pyarrow as pa  # installed with torchtune's `datasets` dependency
    import pyarrow.parquet as pq

    hash_file(path, digest)  # parquet is read by seeking: hashed in a pass of its own
    try:
        pf = pq.ParquetFile(path, pre_buffer=False)  # by default it buffers the whole file
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(f"{where}.source: {str(path)!r} is not a parquet file ({e}); "
                          "accepted: a parquet file with a string column") from None
    with pf:
        names = pf.schema_arrow.names
        if column not in names:
            raise CorpusError(f"{where}.column: {str(path)!r} has no column {column!r} (columns: "
                              f"{names[:8]}); accepted: one of its columns")
        kind = pf.schema_arrow.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
                or pa.types.is_string_view(kind)):
            raise CorpusError(f"{where}.column: column {column!r} of {str(path)!r} is {kind}, not "
                              "a string column; accepted: a column holding the documents' text")
        row = 0
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[column]):
            values = batch.column(0)
            if values.null_count:
                first = row + next(i for i, v in enumerate(values.is_valid().to_pylist()) if not v)
                raise CorpusError(f"{where}.column: {str(path)!r} row {first} of column "
                                  f"{column!r} is null; accepted: a string in every row")
            row += len(values)
            yield from values.to_pylist()
        if row == 0:
            raise NoDocument(f"{where}.source: {str(path)!r} holds no document (0 rows); "
                              "accepted: a file with at least one document")
