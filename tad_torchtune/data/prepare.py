"""Tokenizing a corpus into a token store once, on every core, in memory that does not grow with
the corpus; and finding (or building) the store of a dataset at start-up.

Documents are streamed from the source files in batches and encoded by one of three engines, all
giving exactly the ids of ``tokenizer.encode(doc, add_bos=True, add_eos=True)``, concatenated in
file order (so the store's bytes do not depend on the engine or the number of workers):

- ``batch``: a torchtune ``HuggingFaceBaseTokenizer`` (with its own ``encode``) is run through
  its ``tokenizers.Tokenizer.encode_batch_fast`` on that library's thread pool (every core;
  ``RAYON_NUM_THREADS`` limits it), BOS and EOS added exactly as its ``encode`` adds them;
- ``workers``: any other tokenizer is called in ``num_workers`` worker processes;
- ``inline``: ``num_workers=1``, in this process.

A few batches per worker are in flight at any time, so memory is bounded by the batch size.
"""

import contextlib
import json
import os
import platform
import shutil
import sys
import time
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from tad_torchtune.data.sources import (
    NoDocument, SourceFile, document_format, expand_sources, hash_file, iter_documents,
)
from tad_torchtune.data.store import (
    FORMAT_VERSION, MANIFEST, OFFSETS, PROGRESS, TOKENS, StoreError, StoreWriter, TokenStore,
    interrupted_build, remove_stale_tmp, store_key, token_dtype_for, write_manifest,
    tokenizer_fingerprint, tokenizer_vocab_size,
)
from tad_torchtune.files import TMP_PREFIX, publish_dir, staging_dir, temporary_target

STORE_DIR_ENV = "TAD_TORCHTUNE_STORE_DIR"
WAIT_ENV = "TAD_TORCHTUNE_STORE_WAIT_S"
DEFAULT_STORE_DIR = "~/.cache/tad_torchtune/stores"
DEFAULT_WAIT_S = 7200.0
#: characters of text per batch: the batch engine's batches feed its thread pool, the workers'
#: are small enough to balance the load and large enough to amortise the inter-process copies
BATCH_CHARS = {"batch": 1 << 20, "workers": 1 << 16, "inline": 1 << 16}

EncodeFn = Callable[[list[str], str], tuple[np.ndarray, np.ndarray]]


def default_store_dir() -> Path:
    """``$TAD_TORCHTUNE_STORE_DIR``, else ``~/.cache/tad_torchtune/stores``."""
    return Path(os.environ.get(STORE_DIR_ENV) or DEFAULT_STORE_DIR).expanduser()


def default_num_workers() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# ----------------------------------------------------------------------------------- encoders


class _TokenIdError(Exception):
    """An id outside the store dtype, at document ``doc`` of a batch (picklable from workers)."""

    def __init__(self, doc: int, token: int) -> None:
        super().__init__(doc, token)
        self.doc, self.token = doc, token


def _to_store_dtype(flat: list[int], lengths: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array(flat, dtype=np.int64)
    limit = np.iinfo(dtype).max
    if ids.size and (ids.min() < 0 or ids.max() > limit):
        first = int(np.flatnonzero((ids < 0) | (ids > limit))[0])
        doc = int(np.searchsorted(np.cumsum(lengths), first, side="right"))
        raise _TokenIdError(doc, int(ids[first]))
    return ids.astype(dtype), lengths


def encode_documents(tokenizer: Any, docs: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """``tokenizer.encode(doc, add_bos=True, add_eos=True)`` of each document, concatenated.

    Returns:
        tokens [sum(lengths)] in ``dtype``, lengths [len(docs)] int64.
    """
    lengths = np.empty(len(docs), np.int64)
    flat: list[int] = []
    for i, doc in enumerate(docs):
        ids = tokenizer.encode(doc, add_bos=True, add_eos=True)
        lengths[i] = len(ids)
        flat.extend(ids)
    return _to_store_dtype(flat, lengths, dtype)


class BatchEncoder:
    """``HuggingFaceBaseTokenizer.encode`` for a list of documents, in one ``encode_batch_fast``.

    torchtune's ``encode`` takes the ids of ``tokenizers.Tokenizer.encode(text)`` and inserts
    ``bos_id`` in front unless the Hugging Face post-processor already adds it (``hf_adds_bos``),
    and appends ``eos_id`` unless it adds that (``hf_adds_eos``); so does this.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer.tokenizer
        self._bos = None if tokenizer.hf_adds_bos else int(tokenizer.bos_id)
        self._eos = None if tokenizer.hf_adds_eos else int(tokenizer.eos_id)

    def __call__(self, docs: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
        encode = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        encodings = encode(docs)  # releases the GIL and runs on every core
        lengths = np.empty(len(docs), np.int64)
        flat: list[int] = []
        extra = (self._bos is not None) + (self._eos is not None)
        for i, enc in enumerate(encodings):
            ids = enc.ids
            if self._bos is not None:
                flat.append(self._bos)
            flat.extend(ids)
            if self._eos is not None:
                flat.append(self._eos)
            lengths[i] = len(ids) + extra
        return _to_store_dtype(flat, lengths, dtype)


def batch_encoder(tokenizer: Any) -> BatchEncoder | None:
    """The batch engine for ``tokenizer`` when it has one (a torchtune ``HuggingFaceBaseTokenizer``
    whose ``encode`` is torchtune's own), else None."""
    try:
        from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer
    except ImportError:
        return None
    if not isinstance(tokenizer, HuggingFaceBaseTokenizer):
        return None
    if type(tokenizer).encode is not HuggingFaceBaseTokenizer.encode:
        return None
    return BatchEncoder(tokenizer)


_WORKER_TOKENIZER: Any = None


def _init_worker(tokenizer: Any) -> None:
    import signal

    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer
    # Ctrl-C reaches the whole process group: the parent stops the build; a worker interrupted
    # while it holds the call queue's lock would leave the others, and the parent's shutdown,
    # waiting on it for good
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(Exception):  # Linux: die with the parent instead of waiting forever
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _encode_in_worker(docs: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    return encode_documents(_WORKER_TOKENIZER, docs, dtype)


# ----------------------------------------------------------------------------------- pipeline


@dataclass
class _Batch:
    file: int  # index into the source files
    first_doc: int  # index, within the file, of the batch's first document
    docs: list[str] = field(default_factory=list)
    bytes_read: int = 0  # of all the source files, when the batch was complete (the progress)
    docs_sha256: str = ""  # of the file's documents up to the batch's last (``_docs_digest``)


@dataclass
class _FileEnd:
    file: int
    sha256: str
    num_documents: int


def _count(n: float) -> str:
    """``n`` in tqdm's short form: ``10.1M``."""
    return tqdm.format_sizeof(n)


def _stat(f: SourceFile) -> dict[str, Any]:
    """What a store's manifest and a build's checkpoint record of a source file's stat."""
    return {"path": str(f.path), "size": f.size, "mtime_ns": f.mtime_ns}


def _is_of(entry: dict[str, Any], f: SourceFile) -> bool:
    """Whether a recorded ``entry`` (a source, a checkpoint's ``in_file``) is ``f`` as it is."""
    stat = _stat(f)
    return {k: entry.get(k) for k in stat} == stat


def _files_done(writer: StoreWriter, files: Sequence[SourceFile]
                ) -> tuple[int, int, int, str | None]:
    """What of ``files`` a resumed ``writer`` holds: how many files whole (its sources, if they
    are the first of ``files`` as they are now: the store's key, from their stats, says so;
    checked again), and of the next one, the documents and tokens written (its ``in_file``)."""
    done, part = writer.sources, writer.in_file
    if (len(done) + (part is not None) > len(files)
            or not all(_is_of(s, f) for s, f in zip(done, files))
            or part is not None and not _is_of(part, files[len(done)])):
        raise StoreError(f"the interrupted build in {str(writer.tmp)!r} is of other files; "
                         f"delete it")
    if part is None:
        return len(done), 0, 0, None
    return (len(done), int(part["num_documents"]), int(part["num_tokens"]),
            part.get("docs_sha256"))


def _docs_digest(digest: Any, doc: str) -> None:
    """Feed one document to the digest of a file's documents so far: what a resume checks the
    documents it keeps against (a file rewritten with its size and time kept has another)."""
    data = doc.encode("utf-8", "surrogatepass")
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


def _batches(files: Sequence[SourceFile], *, column: str, where: str, batch_chars: int,
             first: int = 0, documents_before: int = 0, skip: int = 0,
             skip_sha256: str | None = None) -> Iterator[_Batch | _FileEnd]:
    """The documents of ``files[first:]`` in batches of about ``batch_chars`` characters, and
    each file's end with its SHA-256 (``documents_before``: those of the files before; ``skip``:
    the first documents of ``files[first]``, read for its hash but in no batch)."""
    import hashlib

    total = documents_before  # documents
    before = sum(f.size for f in files[:first])  # bytes of the files before this one
    for i, f in enumerate(files):
        if i < first:
            continue
        digest = _CountingDigest(hashlib.sha256())
        docs_digest = hashlib.sha256()
        kept = skip if i == first else 0  # written by the build this one goes on from
        batch, chars, n = _Batch(i, kept), 0, 0
        try:
            for doc in iter_documents(f, column=column, where=where, digest=digest):
                n += 1
                _docs_digest(docs_digest, doc)
                if n <= kept:
                    if (n == kept and skip_sha256 is not None
                            and docs_digest.hexdigest() != skip_sha256):
                        raise StoreError(
                            f"{where}.source: {str(f.path)!r} changed since the interrupted "
                            f"build that this one goes on from (its first {kept:,} documents "
                            f"differ; its size and time do not): that build is deleted, run "
                            f"again; accepted: files that do not change during prepare")
                    continue
                batch.docs.append(doc)
                chars += len(doc)
                if chars >= batch_chars:
                    batch.bytes_read = before + digest.bytes
                    batch.docs_sha256 = docs_digest.hexdigest()
                    yield batch
                    batch, chars = _Batch(i, n), 0
        except NoDocument as e:
            # one empty part of several (Spark writes one per empty partition): a note; a
            # source of one file, or of files that all hold none, is an error
            if len(files) == 1 or (total == 0 and i == len(files) - 1):
                raise
            print(f"tad_torchtune: {str(e).split('; accepted')[0]}: left out", file=sys.stderr,
                  flush=True)
        total += n
        before += f.size
        if batch.docs:
            batch.bytes_read = before
            batch.docs_sha256 = docs_digest.hexdigest()
            yield batch
        now = SourceFile.stat(f.path)
        if (now.size, now.mtime_ns) != (f.size, f.mtime_ns) or n < kept:
            raise StoreError(f"{where}.source: {str(f.path)!r} changed while it was being "
                             "tokenized; accepted: files that do not change during prepare")
        yield _FileEnd(i, digest.hexdigest(), n)


class _CountingDigest:
    """A ``hashlib`` object that counts the bytes it is fed: how far into its file the reader
    is, for the progress bar."""

    def __init__(self, digest: Any) -> None:
        self._digest = digest
        self.bytes = 0

    def update(self, data: Any) -> None:
        self.bytes += memoryview(data).nbytes
        self._digest.update(data)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def _in_order(items: Iterator[_Batch | _FileEnd], encode: EncodeFn, dtype: str,
              executor: Executor | None, window: int) -> Iterator[tuple[Any, Any]]:
    """``(item, encode(item.docs))`` in input order, at most ``window`` batches in flight; a
    ``_TokenIdError`` leaves with the batch it came from as ``.batch``."""

    def done(item: Any, result: Callable[[], Any]) -> tuple[Any, Any]:
        try:
            return item, result()
        except _TokenIdError as e:
            e.batch = item
            raise

    if executor is None:
        for item in items:
            yield done(item, lambda: encode(item.docs, dtype) if isinstance(item, _Batch) else None)
        return
    pending: deque = deque()
    in_flight = 0
    for item in items:
        if isinstance(item, _Batch):
            pending.append((item, executor.submit(encode, item.docs, dtype)))
            in_flight += 1
        else:
            pending.append((item, None))
        while in_flight >= window or (pending and pending[0][1] is None):
            head, future = pending.popleft()
            in_flight -= future is not None
            yield done(head, future.result if future is not None else lambda: None)
    while pending:
        head, future = pending.popleft()
        yield done(head, future.result if future is not None else lambda: None)


#: seconds between two checkpoints of a build (``StoreWriter.checkpoint``), taken between two
#: batches
CHECKPOINT_EVERY_S = 30.0


def build_store(path: Path, files: Sequence[SourceFile], tokenizer: Any, *, column: str = "text",
                token_dtype: str = "uint16", tokenizer_fp: str | None = None,
                num_workers: int | None = None, batch_encode: bool = True,
                where: str = "dataset", progress: bool = True,
                resume: Path | None = None) -> Path:
    """Tokenize ``files`` and publish the store at ``path`` (atomically; see ``StoreWriter``).
    Every ``CHECKPOINT_EVERY_S`` seconds, between two batches, what is written is recorded, so
    that a build killed or interrupted later goes on from there (``resume``), within a file too.

    Args:
        path: the store's folder (``<store_dir>/<store_key(...)>``).
        files: the source files (``expand_sources``).
        tokenizer: any torchtune tokenizer with ``encode(text, add_bos, add_eos)``.
        column: field of JSON lines / column of parquet files holding the text.
        token_dtype: ``"uint16"`` or ``"uint32"`` (``token_dtype_for``).
        tokenizer_fp: ``tokenizer_fingerprint(tokenizer)``, when already computed.
        num_workers: worker processes of the ``workers`` engine (default: every core); 1 encodes
            in this process.
        batch_encode: use the ``batch`` engine when the tokenizer has one.
        where: the config key of the dataset, for error messages.
        progress: show a progress bar on stderr: the share of the source files' bytes read
            (its percentage and time left), the tokens written and their rate.
        resume: the temporary folder of an interrupted build of this store
            (``store.interrupted_build``): the files it completed are kept, not read again; the
            documents it wrote of the file it was in are kept, that file read again from its
            start for its hash (not tokenized).

    Returns:
        ``path``.

    Raises:
        CorpusError: a file that cannot be read (``sources.iter_documents``).
        StoreError: an id that does not fit ``token_dtype``; no token at all.
    """
    workers = default_num_workers() if num_workers is None else int(num_workers)
    if workers < 1:
        raise StoreError(f"num_workers: must be an integer >= 1, got {num_workers!r}")
    tokenizer_fp = tokenizer_fp or tokenizer_fingerprint(tokenizer)
    fast = batch_encoder(tokenizer) if batch_encode else None
    engine = "batch" if fast is not None else "workers" if workers > 1 else "inline"
    executor: Executor | None = None
    if engine == "batch":  # one thread encodes while the other converts the previous batch
        executor, encode, window = ThreadPoolExecutor(2), fast, 3
    elif engine == "workers":
        import multiprocessing as mp

        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        executor = ProcessPoolExecutor(workers, mp_context=mp.get_context(method),
                                       initializer=_init_worker, initargs=(tokenizer,))
        encode, window = _encode_in_worker, 2 * workers
    else:
        encode, window = partial(encode_documents, tokenizer), 1
    vocab = tokenizer_vocab_size(tokenizer)
    info = {"class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
            "fingerprint": tokenizer_fp, "vocab_size": vocab,
            "bos_id": getattr(tokenizer, "bos_id", None), "eos_id": getattr(tokenizer, "eos_id", None)}
    start = time.perf_counter()
    try:
        with StoreWriter(path, token_dtype=token_dtype, tokenizer=info, column=column,
                         resume=resume) as writer, \
                tqdm(total=sum(f.size for f in files), unit="B", unit_scale=True,
                     unit_divisor=1024, desc="tad_torchtune: tokenizing", file=sys.stderr,
                     disable=not progress, mininterval=1.0, dynamic_ncols=True) as bar:
            done, file_documents, file_tokens, file_sha256 = _files_done(writer, files)
            if done or file_documents:
                part = (f" and {file_documents:,} document(s) of the next" if file_documents
                        else "")
                bar.write(f"tad_torchtune: going on from an interrupted build: {done} of "
                          f"{len(files)} file(s){part}, {writer.num_tokens:,} tokens, kept",
                          file=sys.stderr)
                bar.update(sum(f.size for f in files[:done]))
            items = _batches(files, column=column, where=where, batch_chars=BATCH_CHARS[engine],
                             first=done, documents_before=writer.num_documents,
                             skip=file_documents, skip_sha256=file_sha256)
            saved = time.perf_counter()
            try:
                for batch, result in _in_order(items, encode, token_dtype, executor, window):
                    f = files[batch.file]
                    if isinstance(batch, _FileEnd):
                        writer.add_source({**_stat(f), "sha256": batch.sha256,
                                           "num_documents": batch.num_documents,
                                           "num_tokens": file_tokens})
                        file_tokens, in_file = 0, None
                    else:
                        tokens, lengths = result
                        writer.append(tokens, lengths)
                        file_tokens += tokens.size
                        in_file = {**_stat(f), "num_documents": batch.first_doc + len(batch.docs),
                                   "num_tokens": file_tokens, "docs_sha256": batch.docs_sha256}
                        rate = writer.num_tokens / max(time.perf_counter() - start, 1e-9)
                        bar.set_postfix_str(f"{_count(writer.num_tokens)} tokens, {_count(rate)} "
                                            f"tokens/s, file {batch.file + 1}/{len(files)}",
                                            refresh=False)
                        bar.update(batch.bytes_read - bar.n)
                    if (time.perf_counter() - saved >= CHECKPOINT_EVERY_S
                            and len(writer.sources) < len(files)):  # else: published next
                        writer.checkpoint(in_file)
                        saved = time.perf_counter()
            except _TokenIdError as e:
                limit = np.iinfo(token_dtype).max + 1
                hint = f", or {where}.token_dtype: uint32" if token_dtype == "uint16" else ""
                raise StoreError(
                    f"tokenizer: encode gave id {e.token} in document {e.batch.first_doc + e.doc + 1} "
                    f"of {str(files[e.batch.file].path)!r}, which the store's {token_dtype} cannot "
                    f"hold (the tokenizer reports a vocabulary of {vocab} ids); accepted: ids in "
                    f"[0, {limit}): a tokenizer whose vocab_size covers its ids{hint}"
                ) from None
            bar.update(bar.total - bar.n)  # the files' ends that yielded no batch
            seconds = time.perf_counter() - start
            writer.publish(build={
                "engine": engine, "num_workers": workers if engine == "workers" else None,
                "seconds": round(seconds, 3),
                "tokens_per_second": round(writer.num_tokens / max(seconds, 1e-9)),
                "host": platform.node(), "pid": os.getpid(),
            })
        if resume is not None and Path(resume) != writer.tmp:  # refused (damaged): not kept
            shutil.rmtree(resume, ignore_errors=True)
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    return path


# ---------------------------------------------------------------------------- find or build


def _builds_here() -> bool:
    """Under torchrun, local rank 0 builds a missing store (one per node, in case the store
    folder is not shared); any other process builds it only when it runs on its own."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def _lock_path(store_dir: Path, key: str) -> Path:
    """The file whose lock a build of store ``key`` holds (``_build_lock``)."""
    return store_dir / f".{key}.lock"


@contextlib.contextmanager
def _build_lock(store_dir: Path, key: str) -> Iterator[bool]:
    """An exclusive lock per store (released by the kernel if its holder is killed), and
    whether it is held; where the file system has no locks, concurrent builders both build
    (none going on from an interrupted build) and the first rename wins."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(_lock_path(store_dir, key), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"tad_torchtune: waiting for another process building {store_dir / key}",
                  file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            yield False
            return
        yield True


def _sha256(hashes: dict[int, str], i: int, path: Path) -> str:
    """The SHA-256 of file ``i`` at ``path``, read once: kept in ``hashes``."""
    if i not in hashes:
        hashes[i] = hash_file(path).hexdigest()
    return hashes[i]


def _link_a_store_of_these_contents(root: Path, path: Path, files: Sequence[SourceFile], *,
                                    tokenizer_fp: str, column: str,
                                    token_dtype: str) -> Path | None:
    """Publish at ``path`` the store of ``files`` from a store in ``root`` built from files of
    the same contents (their SHA-256, which its manifest records, in the same order; the same
    tokenizer, column and dtype): a corpus touched, or copied with its times, elsewhere has
    another key (the key is ``stat``-based, so start-up reads nothing) but needs no second
    tokenization. Its binary files are hard-linked (copied where links fail), its manifest
    names these files. Only files of the sizes a store records are hashed.

    Returns:
        The folder of the store linked, or None when no store has these contents.
    """
    sizes = [f.size for f in files]
    hashes: dict[int, str] = {}
    for manifest_path in sorted(root.glob(f"*/{MANIFEST}")):
        if manifest_path.parent.name.startswith(TMP_PREFIX):  # a build's, not a store
            continue
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            sources = manifest["sources"]
            if (manifest["format_version"] != FORMAT_VERSION
                    or manifest["tokenizer"]["fingerprint"] != tokenizer_fp
                    or manifest["column"] != column or manifest["token_dtype"] != token_dtype
                    or [s["size"] for s in sources] != sizes):
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not all(_sha256(hashes, i, f.path) == s.get("sha256")
                   for i, (f, s) in enumerate(zip(files, sources))):
            continue
        folder = manifest_path.parent
        tmp = staging_dir(path)
        for name in (TOKENS, OFFSETS):
            try:
                os.link(folder / name, tmp / name)
            except OSError:
                shutil.copyfile(folder / name, tmp / name)
        manifest["sources"] = [{**s, "path": str(f.path), "mtime_ns": f.mtime_ns}
                               for f, s in zip(files, sources)]
        manifest["build"] = {**manifest.get("build", {}), "linked_from": str(folder)}
        write_manifest(tmp, manifest)
        publish_dir(tmp, path)
        return folder
    return None


#: a .txt file is one document, tokenized whole: its size above which that is said (about
#: 1 GiB of memory at 120x; measured 140x with the demo's tokenizer, 280x with a byte-level one)
LARGE_TEXT_FILE = 8 * 2**20


def _warn_of_large_text_files(files: Sequence[SourceFile], where: str) -> None:
    """One warning line per large ``.txt`` file: a document tokenized whole takes about 120x
    its size in memory (the Hugging Face tokenizer's encoding holds ~300 bytes per token)."""
    for f in files:
        if f.size > LARGE_TEXT_FILE and document_format(f.path, where=where)[0] == "text":
            gz = " (compressed: more)" if f.path.name.lower().endswith(".gz") else ""
            print(f"tad_torchtune: warning: {where}.source: {str(f.path)!r} is one document of "
                  f"{f.size / 2**20:.0f} MiB{gz}, tokenized whole: about "
                  f"{120 * f.size / 2**30:.1f} GiB of memory; JSON Lines or parquet with a "
                  f"document per row are tokenized in bounded memory", file=sys.stderr,
                  flush=True)


#: an interrupted build of another store is kept for this long after its last checkpoint, for
#: its corpus to be built again (``_remove_abandoned_builds``)
KEEP_INTERRUPTED_S = 7 * 24 * 3600.0


def _remove_abandoned_builds(store_dir: Path, key: str) -> None:
    """Remove the temporary folders of killed builds of OTHER stores in ``store_dir`` (a corpus
    touched after a killed build gets another key, so that build's folder would stay for
    good): those whose store's lock nobody holds, but a build with a checkpoint younger than
    ``KEEP_INTERRUPTED_S`` (its next build goes on from it). Without file locks nothing is
    removed."""
    try:
        import fcntl
    except ImportError:
        return
    others = {temporary_target(tmp.name) for tmp in store_dir.glob(f"{TMP_PREFIX}*")}
    for other in sorted(others - {key, None}):
        lock = _lock_path(store_dir, other)
        if not lock.is_file():
            continue
        with open(lock, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # being built now (or no locks here): left alone
                continue
            kept = interrupted_build(store_dir, other)
            if kept is not None and time.time() - (kept / PROGRESS).stat().st_mtime > (
                    KEEP_INTERRUPTED_S):
                kept = None
            remove_stale_tmp(store_dir, other, keep=kept)


def _check_writable(root: Path, where: str) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        writable = os.access(root, os.W_OK | os.X_OK)
        reason = "not writable"
    except OSError as e:
        writable, reason = False, e.strerror or str(e)
    if not writable:
        raise StoreError(f"{where}.store_dir: cannot build a token store in {str(root)!r} "
                         f"({reason}); accepted: a writable folder (default: ${STORE_DIR_ENV}, "
                         f"else {DEFAULT_STORE_DIR})")


def _wait_for(path: Path, where: str) -> None:
    timeout = float(os.environ.get(WAIT_ENV) or DEFAULT_WAIT_S)
    deadline = time.monotonic() + timeout
    while not (path / MANIFEST).is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{where}: waited {timeout:g} s for local rank 0 to build the token store "
                f"{str(path)!r}; build it beforehand with `tune run tad_prepare --config CONFIG`, "
                f"or raise {WAIT_ENV}"
            )
        time.sleep(0.2)


def prepare_store(source: str | Sequence[str], tokenizer: Any, *, column: str = "text",
                  store_dir: str | os.PathLike | None = None, token_dtype: str = "auto",
                  num_workers: int | None = None, where: str = "dataset",
                  progress: bool = True) -> tuple[TokenStore, bool]:
    """The store of ``source`` tokenized by ``tokenizer``: mapped if it exists, else built.

    Start-up cost is O(number of files): ``stat`` of every file and the tokenizer fingerprint
    give the store's key; nothing of the corpus is read when the store exists. A missing store is
    built once: under torchrun by local rank 0 while the other ranks wait for its manifest (at
    most ``$TAD_TORCHTUNE_STORE_WAIT_S`` s, default 7200); otherwise by the process that takes
    the store's lock, the others waiting on it. Leftovers of killed builds are removed first.

    Args:
        source: a file, a folder, a glob or a list of them (``sources.expand_sources``).
        tokenizer: any torchtune tokenizer with ``encode(text, add_bos, add_eos)``.
        column: field of JSON lines / column of parquet files holding the text.
        store_dir: folder of the stores (default ``default_store_dir()``).
        token_dtype: ``"auto"`` (uint16 when the vocabulary fits), ``"uint16"`` or ``"uint32"``.
        num_workers: worker processes for a tokenizer without the batch engine (default: every
            core).
        where: the config key of the dataset, for error messages.
        progress: show a progress bar while building.

    Returns:
        The mapped store, and whether this call built it.

    Raises:
        CorpusError, StoreError: bad input, naming the config key (see ``build_store``), or a
            store built by another tokenizer or from other files.
        TimeoutError: a waiting rank whose store did not appear in time.
    """
    files = expand_sources(source, where=where)
    dtype = token_dtype_for(tokenizer, token_dtype, where=where)
    fp = tokenizer_fingerprint(tokenizer)
    root = Path(store_dir).expanduser() if store_dir is not None else default_store_dir()
    key = store_key(files, tokenizer_fp=fp, column=column, token_dtype=dtype)
    path = root / key
    built, same = False, None
    if not (path / MANIFEST).is_file():
        if _builds_here():
            _check_writable(root, where)
            with _build_lock(root, key) as locked:
                resume = None
                if not (path / MANIFEST).is_file():
                    # without a lock another builder may be going on from the same folder
                    resume = interrupted_build(root, key) if locked else None
                    remove_stale_tmp(root, key, keep=resume)
                    _remove_abandoned_builds(root, key)
                    same = _link_a_store_of_these_contents(root, path, files, tokenizer_fp=fp,
                                                           column=column, token_dtype=dtype)
                    if same is not None and resume is not None:  # not needed after all
                        shutil.rmtree(resume, ignore_errors=True)
                if not (path / MANIFEST).is_file():
                    total = sum(f.size for f in files)
                    print(f"tad_torchtune: building the token store of {len(files)} file(s) "
                          f"({total / 2**20:.1f} MiB) at {path}", file=sys.stderr, flush=True)
                    _warn_of_large_text_files(files, where)
                    build_store(path, files, tokenizer, column=column, token_dtype=dtype,
                                tokenizer_fp=fp, num_workers=num_workers, where=where,
                                progress=progress, resume=resume)
                    built = True
        else:
            _wait_for(path, where)
    store = TokenStore.open(path, where=where)
    store.check(tokenizer_fp=fp, files=files, where=where)
    if same is not None:
        store.linked_from = same
        print(f"tad_torchtune: the token store {str(path)!r} is that of {str(same)!r} (its "
              f"files' SHA-256 are these files'; moved or touched since): linked, not tokenized "
              f"again", file=sys.stderr, flush=True)
    if built:
        b = store.manifest["build"]
        print(f"tad_torchtune: built {path}: {store.num_tokens:,} tokens, "
              f"{store.num_documents:,} documents ({store.manifest['token_dtype']}) in "
              f"{b['seconds']:.1f} s, {b['tokens_per_second']:,} tokens/s ({b['engine']})",
              file=sys.stderr, flush=True)
    return store, built
