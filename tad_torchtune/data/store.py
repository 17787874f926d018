"""The prepared token store: format, fingerprints, an atomic writer and a memory-mapped reader.

A store is a folder of three files:

- ``tokens.bin``: every document's token ids, concatenated, little-endian ``uint16`` when the
  tokenizer's vocabulary fits (ids < 65536), else ``uint32``;
- ``offsets.bin``: ``int64``, ``num_documents + 1`` entries; document ``d`` is
  ``tokens[offsets[d] : offsets[d + 1]]`` (``offsets[0] = 0``, ``offsets[-1] = num_tokens``);
- ``manifest.json``: format and version, token and document counts, token dtype, the tokenizer's
  fingerprint, each source file's path, size, modification time, SHA-256, documents and tokens,
  the SHA-256 of the two binary files, and ``fingerprint``, a hash of the token content.

It is written in a temporary folder beside its final place (``.tmp-<name>-*``) and published by
one ``rename``: a folder under the final name is always complete, whatever killed the writer.

Stores live in ``<store_dir>/<key>``. The key (``store_key``) hashes the format version, the
tokenizer fingerprint, the token dtype, the text column and each source's absolute path, size
and modification time: it is computed at start-up from ``stat`` alone, so opening a store never
reads the corpus. An edited or replaced file changes the key, hence a new store is built.
"""

import hashlib
import json
import mmap
import os
import re
import shutil
import time
import types
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tad_torchtune.data.sources import SourceFile
from tad_torchtune.files import (
    TMP_PREFIX,
    atomic_write_text,
    publish_dir,
    remove_stale,
    staging_dir,
)

FORMAT = "tad_torchtune.token_store"
FORMAT_VERSION = 1
MANIFEST, TOKENS, OFFSETS = "manifest.json", "tokens.bin", "offsets.bin"
#: in a build's temporary folder: what it has written durably (``StoreWriter.checkpoint``)
PROGRESS = "progress.json"
#: the key, in a checkpoint's header, of the file a build was part-way through
IN_FILE = "in_file"
TOKEN_DTYPES = ("auto", "uint16", "uint32")
_NUMPY_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}

#: Text whose ids enter the tokenizer fingerprint: words, digits, punctuation, accents, CJK, an
#: emoji, runs of spaces, tabs and newlines, and strings that tokenizers treat as special tokens.
PROBE_TEXT = (
    "The quick brown fox jumps over the lazy dog. 0123456789 3.14159 $1,000,000 (a+b)*c=d;\n"
    "\tNaïve café, façade, Ångström, straße; 東京都, 안녕하세요, Привет мир! 🙂👍\n"
    "    indented   code():  return x[i] != y  # comment\r\n"
    "<s></s><|endoftext|><|begin_of_text|><|end_of_text|><bos><eos><pad><unk>[CLS][SEP]\n\n"
)
#: Tokenizer attributes that do not change ``encode`` and are left out of the fingerprint.
_NOT_FINGERPRINTED = frozenset({"max_seq_len", "prompt_template", "stop_tokens", "pad_id"})
_PLAIN = (str, int, float, bool, type(None), bytes)


class StoreError(ValueError):
    """A store that cannot be used or built (names the key or folder and what is accepted)."""


# ------------------------------------------------------------------------------ fingerprints


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A stable SHA-256 identifying what ``tokenizer.encode`` computes.

    It hashes (1) the tokenizer's class, (2) its state, walked through its attributes: a Hugging
    Face ``tokenizers.Tokenizer`` by its JSON serialisation (the ``tokenizer.json`` contents), a
    SentencePiece model by its serialised proto, tiktoken's ranks and patterns, vocabularies and
    merge tables as their contents, scalars such as ``bos_id`` / ``eos_id`` by value, and (3) the
    ids of ``encode(PROBE_TEXT, add_bos=True, add_eos=True)``. Attributes that do not affect
    ``encode`` (``max_seq_len``, ``pad_id``, ``stop_tokens``, ``prompt_template``) are left
    out, so ``tad_torchtune.demo.demo_tokenizer()`` and a plain ``HuggingFaceBaseTokenizer`` over
    the same files share their stores. Two loads of the same files give the same fingerprint.

    Args:
        tokenizer: any torchtune tokenizer with ``encode(text, add_bos, add_eos)``.

    Returns:
        64 hexadecimal digits.
    """
    h = hashlib.sha256(b"tad_torchtune.tokenizer_fingerprint/1\0")
    _feed(h, tokenizer, depth=0, seen=set())
    ids = [int(i) for i in tokenizer.encode(PROBE_TEXT, add_bos=True, add_eos=True)]
    h.update(b"\0probe\0" + json.dumps(ids).encode())
    return h.hexdigest()


def _feed(h: Any, obj: Any, *, depth: int, seen: set[int]) -> None:
    kind = type(obj)
    h.update(f"\0{kind.__module__}.{kind.__qualname__}\0".encode())
    if isinstance(obj, _PLAIN):
        h.update(repr(obj).encode("utf-8", "surrogatepass"))
        return
    if depth > 8 or id(obj) in seen or isinstance(obj, (type, types.ModuleType)) \
            or callable(obj) and not hasattr(obj, "__dict__"):
        return  # classes, modules and builtins count by their type name only
    seen.add(id(obj))
    if kind.__module__.startswith("tokenizers") and hasattr(obj, "to_str"):
        h.update(obj.to_str().encode())  # a Hugging Face tokenizers.Tokenizer
    elif hasattr(obj, "serialized_model_proto"):
        h.update(obj.serialized_model_proto())  # a SentencePiece processor
    elif isinstance(obj, re.Pattern):
        h.update(repr(obj.pattern).encode("utf-8", "surrogatepass"))
    elif isinstance(obj, dict):
        if all(isinstance(k, _PLAIN + (tuple,)) and isinstance(v, _PLAIN) for k, v in obj.items()):
            h.update(repr(obj).encode("utf-8", "surrogatepass"))  # a vocabulary: fast path
        else:
            for k, v in obj.items():
                _feed(h, k, depth=depth + 1, seen=seen)
                _feed(h, v, depth=depth + 1, seen=seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _feed(h, v, depth=depth + 1, seen=seen)
    elif isinstance(obj, (set, frozenset)):
        for r in sorted(repr(v) for v in obj):  # sets iterate in a per-process order
            h.update(r.encode("utf-8", "surrogatepass"))
    elif hasattr(obj, "__dict__"):
        for name in sorted(vars(obj)):
            if name not in _NOT_FINGERPRINTED:
                h.update(f"\0.{name}".encode())
                _feed(h, vars(obj)[name], depth=depth + 1, seen=seen)
    # anything else (a compiled extension object) counts by its type only: its repr may hold an
    # address, which differs between processes


def tokenizer_vocab_size(tokenizer: Any) -> int | None:
    """The number of ids the tokenizer can produce, as far as it says (None when it does not).

    The largest of ``tokenizer.vocab_size``, a Hugging Face tokenizer's vocabulary with added
    tokens, and its special ids + 1.
    """
    sizes: list[int] = []
    known = False
    for name in ("vocab_size", "bos_id", "eos_id", "pad_id"):
        try:
            value = getattr(tokenizer, name, None)
        except Exception:  # a property that fails on a partially built tokenizer
            value = None
        if isinstance(value, int) and not isinstance(value, bool):
            sizes.append(value if name == "vocab_size" else value + 1)
            known = known or name == "vocab_size"
    inner = getattr(tokenizer, "tokenizer", None)
    if hasattr(inner, "get_vocab_size"):
        sizes.append(int(inner.get_vocab_size(with_added_tokens=True)))
        known = True
    return max(sizes) if known else None


def token_dtype_for(tokenizer: Any, token_dtype: str = "auto", *, where: str = "dataset") -> str:
    """The store dtype: ``uint16`` when the vocabulary is known to fit, else ``uint32``.

    Args:
        tokenizer: the tokenizer.
        token_dtype: ``"auto"``, ``"uint16"`` or ``"uint32"`` (the dataset's ``token_dtype``).
        where: the config key of the dataset, for error messages.

    Raises:
        StoreError: an unknown ``token_dtype``, or ``uint16`` for a vocabulary above 65536 ids.
    """
    if token_dtype not in TOKEN_DTYPES:
        raise StoreError(f"{where}.token_dtype: must be one of {TOKEN_DTYPES}, got {token_dtype!r}")
    vocab = tokenizer_vocab_size(tokenizer)
    if token_dtype == "uint16" and vocab is not None and vocab > 1 << 16:
        raise StoreError(f"{where}.token_dtype: 'uint16' holds ids below 65536, but the "
                         f"tokenizer's vocabulary has {vocab} ids; accepted: 'auto' or 'uint32'")
    if token_dtype == "auto":
        return "uint16" if vocab is not None and vocab <= 1 << 16 else "uint32"
    return token_dtype


def store_key(files: Sequence[SourceFile], *, tokenizer_fp: str, column: str, token_dtype: str) -> str:
    """The folder name of the store of ``files`` tokenized by the tokenizer ``tokenizer_fp``.

    ``<first file name>[+<more files>]-<16 hex digits>``; from ``stat`` results only.
    """
    spec = {
        "format_version": FORMAT_VERSION, "tokenizer": tokenizer_fp, "column": column,
        "token_dtype": token_dtype, "files": [[str(f.path), f.size, f.mtime_ns] for f in files],
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", files[0].path.name)[:48].lstrip(".") or "corpus"
    more = f"+{len(files) - 1}" if len(files) > 1 else ""
    return f"{name}{more}-{digest}"


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """``folder``'s ``manifest.json``, flushed to disk (the folder is published after it)."""
    with open(folder / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def content_fingerprint(manifest: dict[str, Any]) -> str:
    """SHA-256 of what the store holds: format version, dtype, counts, tokenizer fingerprint and
    the hashes of both binary files; the same for two builds of the same data wherever it lies."""
    fields = {k: manifest[k] for k in ("format_version", "token_dtype", "num_tokens",
                                        "num_documents", "tokens_sha256", "offsets_sha256")}
    fields["tokenizer"] = manifest["tokenizer"]["fingerprint"]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------ writer


class StoreWriter:
    """Writes a store into a temporary folder beside ``path`` and publishes it by one rename.

    Use as a context manager: on an exception the temporary folder is removed and nothing is
    published. ``publish`` is the only way a folder named ``path`` comes to exist.

    Args:
        path: the store's final folder (``<store_dir>/<key>``).
        token_dtype: ``"uint16"`` or ``"uint32"``.
        tokenizer: manifest entry of the tokenizer (at least ``{"fingerprint": ...}``).
        column: the text column the documents were read from.
    """

    def __init__(self, path: Path, *, token_dtype: str, tokenizer: dict[str, Any], column: str,
                 resume: Path | None = None) -> None:
        self.path = Path(path)
        self.dtype = _NUMPY_DTYPES[token_dtype]
        self._header = {"token_dtype": token_dtype, "tokenizer": tokenizer, "column": column}
        self._tokens_sha = hashlib.sha256()
        self._offsets_sha = hashlib.sha256()
        self.num_tokens = 0
        self.num_documents = 0
        self.sources: list[dict[str, Any]] = []
        #: the file a resumed build's checkpoint was taken in, part-way (``checkpoint``)
        self.in_file: dict[str, Any] | None = None
        if resume is not None and self._resume(Path(resume)):
            return
        self.tmp = staging_dir(self.path)
        self._tokens = open(self.tmp / TOKENS, "wb")
        self._offsets = open(self.tmp / OFFSETS, "wb")
        self._write_offsets(np.zeros(1, np.int64))

    def _resume(self, tmp: Path) -> bool:
        """Go on from the last ``checkpoint`` of an interrupted build's folder ``tmp`` (of this
        store, under its lock): its files cut to what the checkpoint counted, their hashes
        read again. False, and nothing changed, when its checkpoint is not of this build."""
        try:
            progress = json.loads((tmp / PROGRESS).read_text(encoding="utf-8"))
            sizes = {TOKENS: progress["tokens_bytes"], OFFSETS: progress["offsets_bytes"]}
            header = dict(progress["header"])
            in_file = header.pop(IN_FILE, None)
            if (header != self._header
                    or not (in_file is None or isinstance(in_file, dict))
                    or not _consistent(progress, in_file, self.dtype.itemsize)
                    or any((tmp / name).stat().st_size < size for name, size in sizes.items())
                    or not all(os.access(p, os.W_OK) for p in (tmp, tmp / TOKENS, tmp / OFFSETS))):
                return False  # not this build's, or not ours to go on with: a new folder
            with open(tmp / OFFSETS, "rb") as f:  # the last offset counted: num_tokens
                f.seek(sizes[OFFSETS] - 8)
                if int.from_bytes(f.read(8), "little") != progress["num_tokens"]:
                    return False
            for name, sha in ((TOKENS, self._tokens_sha), (OFFSETS, self._offsets_sha)):
                with open(tmp / name, "r+b") as f:
                    f.truncate(sizes[name])
                    while chunk := f.read(1 << 24):
                        sha.update(chunk)
        except (OSError, ValueError, KeyError, TypeError):
            self._tokens_sha, self._offsets_sha = hashlib.sha256(), hashlib.sha256()
            return False
        remove_stale(tmp, PROGRESS)  # a checkpoint's file a kill left unrenamed
        self.tmp = tmp
        self._tokens = open(tmp / TOKENS, "ab")
        self._offsets = open(tmp / OFFSETS, "ab")
        self.num_tokens = progress["num_tokens"]
        self.num_documents = progress["num_documents"]
        self.sources = progress["sources"]
        self.in_file = in_file
        return True

    def checkpoint(self, in_file: dict[str, Any] | None = None) -> None:
        """Record, durably, what is written so far, so that a build killed later goes on from
        here (``resume``) instead of starting over: the files of ``sources``, and ``in_file``,
        the file being read when it is part-way through one (its ``path``, ``size`` and
        ``mtime_ns``, and the ``num_documents`` and ``num_tokens`` of it written)."""
        for f in (self._tokens, self._offsets):
            f.flush()
            os.fsync(f.fileno())
        # in the header, which a version that cannot go on part-way through a file compares
        # with its own: it starts over rather than writing that file's first documents twice
        header = self._header if in_file is None else {**self._header, IN_FILE: in_file}
        progress = {"header": header, "num_tokens": self.num_tokens,
                    "num_documents": self.num_documents, "sources": self.sources,
                    "tokens_bytes": self._tokens.tell(), "offsets_bytes": self._offsets.tell()}
        atomic_write_text(self.tmp / PROGRESS, json.dumps(progress))

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:  # an interruption keeps what a checkpoint recorded
            self.abort(keep=issubclass(kind, KeyboardInterrupt))

    def _write_offsets(self, offsets: np.ndarray) -> None:
        data = offsets.astype("<i8", copy=False).tobytes()
        self._offsets.write(data)
        self._offsets_sha.update(data)

    def append(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents: ``tokens`` [sum(lengths)] in the store dtype, ``lengths`` [D] int."""
        assert tokens.dtype == self.dtype and int(lengths.sum()) == tokens.size
        data = tokens.tobytes()
        self._tokens.write(data)
        self._tokens_sha.update(data)
        self._write_offsets(self.num_tokens + np.cumsum(lengths, dtype=np.int64))
        self.num_tokens += tokens.size
        self.num_documents += lengths.size

    def add_source(self, entry: dict[str, Any]) -> None:
        """Record a source file in the manifest (path, size, mtime_ns, sha256, counts)."""
        self.sources.append(entry)

    def publish(self, build: dict[str, Any] | None = None) -> Path:
        """Write the manifest, flush everything to disk and rename the folder into place.

        If another process published the same store first, this one is discarded and theirs
        kept (both hold the same bytes: same files, same tokenizer).

        Returns:
            ``path``.
        """
        if self.num_tokens == 0:
            raise StoreError(f"the corpus of {self.path.name} holds no token; accepted: at least "
                             "one document that the tokenizer turns into tokens")
        for f in (self._tokens, self._offsets):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, **self._header,
            "num_tokens": self.num_tokens, "num_documents": self.num_documents,
            "tokens_sha256": self._tokens_sha.hexdigest(),
            "offsets_sha256": self._offsets_sha.hexdigest(),
            "sources": self.sources,
        }
        manifest["fingerprint"] = content_fingerprint(manifest)
        manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        manifest["build"] = build or {}
        write_manifest(self.tmp, manifest)
        try:
            published = publish_dir(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise StoreError(f"cannot publish the token store at {str(self.path)!r} ({e})"
                             ) from None
        if not published and not (self.path / MANIFEST).is_file():
            raise StoreError(f"cannot publish the token store at {str(self.path)!r}: it exists "
                             "and is not a store; delete it")
        if published:  # removed only now: a build killed before the rename goes on from it
            (self.path / PROGRESS).unlink(missing_ok=True)
        return self.path  # when another process published first, both hold the same bytes

    def abort(self, *, keep: bool = False) -> None:
        """Close and remove the temporary folder (``keep``: kept when a checkpoint is in it,
        for the next build to go on from)."""
        for f in (self._tokens, self._offsets):
            f.close()
        if not (keep and (self.tmp / PROGRESS).is_file()):
            shutil.rmtree(self.tmp, ignore_errors=True)


def _consistent(progress: dict[str, Any], in_file: dict[str, Any] | None, itemsize: int) -> bool:
    """Whether a checkpoint's counts agree with each other: its files' sizes with its totals, its
    totals with its sources' and the part of a file's (a damaged or edited ``progress.json`` is
    not gone on from)."""
    tokens, documents = progress["num_tokens"], progress["num_documents"]
    part = [in_file] if in_file is not None else []
    counts = [(s["num_tokens"], s["num_documents"]) for s in progress["sources"] + part]
    return (all(type(v) is int and v >= 0 for c in counts for v in c)
            and type(tokens) is int and type(documents) is int
            and progress["tokens_bytes"] == tokens * itemsize
            and progress["offsets_bytes"] == (documents + 1) * 8
            and sum(c[0] for c in counts) == tokens and sum(c[1] for c in counts) == documents)


def interrupted_build(store_dir: Path, key: str) -> Path | None:
    """The temporary folder of the killed or interrupted build of ``key`` that got furthest
    (its ``StoreWriter.checkpoint``), if any (call under the store's lock)."""
    best, most = None, -1
    for tmp in Path(store_dir).glob(f"{TMP_PREFIX}{key}-*"):
        try:
            done = json.loads((tmp / PROGRESS).read_text(encoding="utf-8"))["num_tokens"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(done, int) and done > most:
            best, most = tmp, done
    return best


def remove_stale_tmp(store_dir: Path, key: str, *, keep: Path | None = None) -> None:
    """Remove the temporary folders left by killed builds of ``key`` but ``keep`` (call under
    its lock)."""
    remove_stale(store_dir, key, keep=keep)


# ------------------------------------------------------------------------------------ reader


def _map(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    """``count`` items of ``path`` as a read-only array backed by the page cache (nothing read)."""
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mapped, dtype=dtype, count=count)


class TokenStore:
    """A published store, memory-mapped: opening it reads the manifest and nothing else.

    Attributes:
        path: the store folder.
        manifest: the parsed ``manifest.json``.
        tokens: [num_tokens] uint16 or uint32, read-only, memory-mapped.
        offsets: [num_documents + 1] int64, read-only, memory-mapped.
        linked_from: the store of the same contents this one was just linked from
            (``prepare.prepare_store``: a corpus touched or copied), else None.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], tokens: np.ndarray, offsets: np.ndarray) -> None:
        self.path = path
        self.manifest = manifest
        self.tokens = tokens
        self.offsets = offsets
        self.linked_from: Path | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["num_tokens"])

    @property
    def num_documents(self) -> int:
        return int(self.manifest["num_documents"])

    @property
    def fingerprint(self) -> str:
        """The content fingerprint (``content_fingerprint``)."""
        return str(self.manifest["fingerprint"])

    @classmethod
    def open(cls, path: Path, *, where: str = "dataset") -> "TokenStore":
        """Map the store at ``path``.

        Raises:
            StoreError: no manifest, an unknown format or version, or files whose sizes
                disagree with the manifest (a damaged store).
        """
        path = Path(path)
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StoreError(f"{where}: {str(path)!r} is not a token store (no {MANIFEST})") from None
        except json.JSONDecodeError as e:
            raise StoreError(f"{where}: the token store {str(path)!r} is damaged ({MANIFEST}: "
                             f"{e}); delete the folder and it is rebuilt") from None
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{where}: the token store {str(path)!r} has format {manifest.get('format')!r} "
                f"version {manifest.get('format_version')!r}; accepted: {FORMAT!r} version "
                f"{FORMAT_VERSION} (delete the folder and it is rebuilt)"
            )
        dtype = _NUMPY_DTYPES[manifest["token_dtype"]]
        n_tokens, n_docs = int(manifest["num_tokens"]), int(manifest["num_documents"])
        for name, expected in ((TOKENS, n_tokens * dtype.itemsize), (OFFSETS, (n_docs + 1) * 8)):
            size = (path / name).stat().st_size if (path / name).is_file() else None
            if size != expected:
                raise StoreError(f"{where}: the token store {str(path)!r} is damaged: {name} holds "
                                 f"{size} bytes, its manifest says {expected}; delete the folder "
                                 "and it is rebuilt")
        tokens = _map(path / TOKENS, dtype, n_tokens)
        offsets = _map(path / OFFSETS, np.dtype("<i8"), n_docs + 1)
        if offsets[-1] != n_tokens:
            raise StoreError(f"{where}: the token store {str(path)!r} is damaged: its last offset "
                             f"is {int(offsets[-1])}, not num_tokens {n_tokens}; delete the folder "
                             "and it is rebuilt")
        return cls(path, manifest, tokens, offsets)

    def check(self, *, tokenizer_fp: str, files: Sequence[SourceFile], where: str = "dataset") -> None:
        """Refuse a store built by another tokenizer or from other files (both from ``stat``).

        Raises:
            StoreError: naming the store and what differs.
        """
        built_by = self.manifest["tokenizer"]["fingerprint"]
        if built_by != tokenizer_fp:
            raise StoreError(
                f"{where}: the token store {str(self.path)!r} was built by another tokenizer "
                f"(fingerprint {built_by[:16]}, this tokenizer's is {tokenizer_fp[:16]}); "
                f"accepted: a store built by this tokenizer (delete the folder and it is rebuilt, "
                f"or set {where}.store_dir to another folder)"
            )
        built_from = [(s["path"], s["size"], s["mtime_ns"]) for s in self.manifest["sources"]]
        given = [(str(f.path), f.size, f.mtime_ns) for f in files]
        if built_from != given:
            raise StoreError(
                f"{where}: the token store {str(self.path)!r} was built from other files "
                f"({len(built_from)} files, first {built_from[0][0]!r}) than {where}.source "
                f"({len(given)} files, first {given[0][0]!r}); accepted: a store of these files "
                "(delete the folder and it is rebuilt)"
            )

    def __reduce__(self):  # pickled (DataLoader workers under spawn) as its path, re-mapped there
        return (TokenStore.open, (self.path,))
