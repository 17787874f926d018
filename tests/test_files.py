"""Files published whole (``files.py``): a folder renamed into place or kept when another writer
was first, a text file replaced in one step, and the leftovers of killed writers removed."""

import os

import pytest

from tad_torchtune import files
from tad_torchtune.files import (
    TMP_PREFIX,
    atomic_write_text,
    publish_dir,
    remove_stale,
    staging_dir,
)


def _written(final, text):
    """A staging folder beside ``final`` holding ``data.txt`` = ``text``."""
    tmp = staging_dir(final)
    (tmp / "data.txt").write_text(text)
    return tmp


def test_staging_dir_is_a_new_empty_hidden_folder_beside_the_final_one(tmp_path):
    final = tmp_path / "deep" / "store"
    a, b = staging_dir(final), staging_dir(final)
    assert a != b and a.parent == b.parent == final.parent  # parents made, one name per writer
    assert a.is_dir() and not any(a.iterdir())
    assert a.name.startswith(f"{TMP_PREFIX}store-{os.getpid()}-")
    assert not final.exists()


def test_publish_dir_moves_the_folder_into_place(tmp_path):
    final = tmp_path / "shard"
    tmp = _written(final, "new")
    assert publish_dir(tmp, final) is True
    assert (final / "data.txt").read_text() == "new" and not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard"]


def test_publish_dir_keeps_what_another_writer_published_first(tmp_path):
    final = tmp_path / "shard"
    publish_dir(_written(final, "first"), final)
    tmp = _written(final, "second")
    assert publish_dir(tmp, final) is False
    assert (final / "data.txt").read_text() == "first"
    assert not tmp.exists()  # the loser's copy is removed, nothing left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard"]


def test_publish_dir_replaces_when_asked(tmp_path):
    final = tmp_path / "step_000002"
    publish_dir(_written(final, "old"), final)
    (final / "only_in_old.txt").write_text("x")
    assert publish_dir(_written(final, "new"), final, replace=True) is True
    assert sorted(p.name for p in final.iterdir()) == ["data.txt"]  # the old folder is gone
    assert (final / "data.txt").read_text() == "new"


def test_publish_dir_replaces_by_two_renames_and_deletes_the_old_folder_last(tmp_path,
                                                                             monkeypatch):
    """The old folder is renamed aside, the new one renamed in, and only then is the old one
    deleted: ``final`` is missing for the instant between two renames, not for as long as a
    checkpoint takes to delete. A writer killed between the renames leaves the old folder
    under a temporary name, which ``remove_stale`` clears."""
    final = tmp_path / "step_000002"
    publish_dir(_written(final, "old"), final)
    deleted = []
    real_rmtree = files.shutil.rmtree

    def rmtree(path, *args, **kwargs):
        deleted.append(((path / "data.txt").read_text(), (final / "data.txt").read_text()))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(files.shutil, "rmtree", rmtree)
    publish_dir(_written(final, "new"), final, replace=True)
    assert deleted == [("old", "new")]  # the old one deleted while the new one is in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000002"]
    monkeypatch.undo()

    real_rename = os.rename

    def killed(src, dst):
        if dst == final:  # the new folder's rename: the old one is already aside
            raise KeyboardInterrupt
        real_rename(src, dst)

    new = _written(final, "newer")
    monkeypatch.setattr(files.os, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        publish_dir(new, final, replace=True)
    monkeypatch.undo()
    (aside,) = [p for p in tmp_path.iterdir() if p not in (final, new)]
    assert (aside / "data.txt").read_text() == "new" and not final.exists()
    remove_stale(tmp_path, "step_*")  # both leftovers of the killed writer
    assert not any(tmp_path.iterdir())


def test_publish_dir_raises_other_failures_and_leaves_the_folder(tmp_path):
    tmp = _written(tmp_path / "x", "data")
    with pytest.raises(OSError):
        publish_dir(tmp, tmp_path / "missing_parent" / "x")
    assert (tmp / "data.txt").read_text() == "data"


def test_atomic_write_text_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "latest"
    atomic_write_text(path, "step_000002")
    atomic_write_text(path, "step_000004")
    assert path.read_text() == "step_000004"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_atomic_write_text_rewrites_a_file_from_its_own_lines(tmp_path):
    """The lines of an iterable, read from the very file being replaced (a file trimmed line by
    line in constant memory): the reader sees the old file to its end."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(f'{{"step": {i}}}\n' for i in range(1, 6)))
    with open(path, encoding="utf-8") as f:
        atomic_write_text(path, (line for line in f if '"step": 3' not in line))
    assert path.read_text() == "".join(f'{{"step": {i}}}\n' for i in (1, 2, 4, 5))
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_a_write_killed_before_the_rename_leaves_the_old_text(tmp_path, monkeypatch):
    """The text is written to a temporary file first: a failure before ``os.replace`` leaves the
    previous content whole, and ``remove_stale`` clears the temporary the writer left."""
    path = tmp_path / "manifest.json"
    atomic_write_text(path, "old")

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    left = [p for p in tmp_path.iterdir() if p != path]
    assert len(left) == 1 and left[0].read_text() == "new"
    remove_stale(tmp_path, "manifest.json")
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_remove_stale_removes_only_the_leftovers_of_that_name(tmp_path):
    keep = [tmp_path / "shard_000000", tmp_path / f"{TMP_PREFIX}other-1-ab", tmp_path / "plain"]
    for p in keep[:2]:
        p.mkdir()
    keep[2].write_text("x")
    stale_dir = staging_dir(tmp_path / "shard_000001")
    (stale_dir / "ids.npy").write_bytes(b"half")
    stale_file = tmp_path / f"{TMP_PREFIX}shard_000002-7-cd"
    stale_file.write_text("half")
    remove_stale(tmp_path, "shard_*")  # a glob, as the teacher cache calls it
    assert sorted(tmp_path.iterdir()) == sorted(keep)
