"""Files written so that a reader never sees half of them: written beside their final place
under a temporary name, flushed, then published by one rename. The token store, the teacher
cache and the training checkpoints all write this way, so a process killed at any moment leaves
either the previous state or the new one, never a mixture."""

import errno
import os
import secrets
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import IO

#: prefix of the temporary names (``.tmp-<name>-<pid>-<random>``), so stale ones can be found
TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries to disk (best effort: some file systems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_path(final: Path) -> Path:
    """A fresh name beside ``final`` for writing it: ``.tmp-<name>-<pid>-<random>``."""
    return final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}-{secrets.token_hex(4)}"


def temporary_target(name: str) -> str | None:
    """The name of what the temporary file or folder ``name`` (``temporary_path``'s) was
    written for, or None for another name."""
    if not name.startswith(TMP_PREFIX) or name.count("-") < 3:
        return None
    return name[len(TMP_PREFIX):].rsplit("-", 2)[0]


def staging_dir(final: Path) -> Path:
    """A new empty folder beside ``final`` to write its content into (``publish_dir`` then
    renames it). ``mkdir`` rather than ``mkdtemp``: the umask's permissions, so a shared folder
    stays shared."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(final)
    os.mkdir(tmp)
    return tmp


def publish_dir(tmp: Path, final: Path, *, replace: bool = False) -> bool:
    """Rename the written folder ``tmp`` into place as ``final``, after flushing it.

    Args:
        replace: replace an existing ``final`` (a checkpoint rewritten): it is renamed aside
            (``temporary_path``'s name, which ``remove_stale`` clears), ``tmp`` renamed in, and
            only then the old one deleted, so ``final`` is missing for the instant between two
            renames, not while a whole folder is deleted. Otherwise an existing ``final`` wins
            (another writer published the same content first) and ``tmp`` is removed.

    Returns:
        True when ``tmp`` became ``final``, False when an existing one was kept.

    Raises:
        OSError: the rename failed for another reason (``tmp`` is left for the caller, and a
            replaced ``final`` is put back).
    """
    fsync_dir(tmp)
    aside = None
    if replace and final.exists():
        aside = temporary_path(final)
        os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except OSError as e:
        if aside is not None:
            os.rename(aside, final)
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise
    fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return True


def atomic_write_text(path: Path, text: str | Iterable[str]) -> None:
    """Write ``text`` (a string, or the strings of an iterable one after another: a file
    rewritten line by line in constant memory) to ``path`` by a temporary file and one
    ``os.replace``."""
    path = Path(path)
    tmp = temporary_path(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines([text] if isinstance(text, str) else text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_stale(folder: Path, name: str, *, keep: Path | None = None) -> None:
    """Remove the temporary files and folders that killed writers of ``name`` left in
    ``folder`` but ``keep`` (call it while no other writer of ``name`` runs)."""
    for tmp in Path(folder).glob(f"{TMP_PREFIX}{name}-*"):
        if tmp == keep:
            continue
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def hold_lock(path: Path) -> "IO[str] | None":
    """Take the exclusive lock of the file ``path`` for this process, without waiting, and
    write this process's id in it: held while the returned file stays open, released by the
    kernel when the process dies (a POSIX record lock: another process conflicts, this one
    does not). None where the file system has no locks.

    Raises:
        BlockingIOError: another process holds it; its id is ``lock_holder(path)``.
    """
    try:
        import fcntl
    except ImportError:
        return None
    f = open(path, "a+")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise
    except OSError:  # no locks here (some network file systems)
        f.close()
        return None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def lock_holder(path: Path) -> str:
    """The process id ``hold_lock`` wrote in ``path`` ("?" if none can be read)."""
    try:
        return path.read_text().strip() or "?"
    except OSError:
        return "?"
