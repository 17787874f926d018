"""Training checkpoints (``checkpointing.py``) on one process: model and optimizer come back
exactly (the next step equals the uninterrupted one), ``latest`` names the newest complete
checkpoint and never a half-written one, and only the last ``keep_last`` are kept. (Resuming a
whole run, on one or two processes: ``tests/recipes/test_tad_distill.py``.)"""

import shutil
import warnings
from pathlib import Path

import pytest
import torch

from tad_torchtune import checkpointing, files
from tad_torchtune.checkpointing import (
    LATEST,
    META,
    TrainingCheckpointer,
    rng_state,
    set_rng_state,
)
from tad_torchtune.errors import ConfigError

# one process without a process group is what these tests mean
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _step(model, optimizer, seed: int) -> None:
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(seed))
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_save_and_load_round_trip_and_the_next_step_is_the_same(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    for i in range(3):
        _step(model, optimizer, i)
    ckpt = TrainingCheckpointer(tmp_path / "checkpoints")
    meta = {"step": 3, "epoch": 0, "samples": 24, "fingerprint": "abc"}
    with warnings.catch_warnings():  # one process: no warning (torch's assumes-one-process one)
        warnings.simplefilter("error")
        path = ckpt.save(3, model, optimizer, meta)
    assert path == tmp_path / "checkpoints" / "step_000003" and (path / META).is_file()
    saved = _params(model)
    _step(model, optimizer, 3)  # the uninterrupted run's next step
    expected = _params(model)

    fresh, fresh_opt = _model_and_optimizer(1)  # other weights, no optimizer state yet
    assert any(not torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ckpt.load(ckpt.latest(), fresh, fresh_opt) == meta
    for k, v in saved.items():
        assert torch.equal(fresh.state_dict()[k], v), k
    state, fresh_state = optimizer.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert sorted(fresh_state) == sorted(state) and fresh_state[0]["step"] == 3
    _step(fresh, fresh_opt, 3)
    for k, v in expected.items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_latest_names_the_newest_and_keep_last_prunes(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    ckpt = TrainingCheckpointer(tmp_path, keep_last=2)
    assert ckpt.latest() is None
    for step in (2, 4, 6):
        _step(model, optimizer, step)
        ckpt.save(step, model, optimizer, {"step": step})
        assert ckpt.latest() == tmp_path / f"step_{step:06d}"
        assert (tmp_path / LATEST).read_text() == f"step_{step:06d}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000004", "step_000006"]
    one = TrainingCheckpointer(tmp_path, keep_last=1)
    one.save(8, model, optimizer, {"step": 8})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000008"]
    assert one.load(one.latest(), model, optimizer) == {"step": 8}


def test_a_save_killed_before_publication_is_never_latest(tmp_path, monkeypatch):
    """A process killed while writing leaves ``.step_N.incomplete``: ``latest`` still names the
    previous checkpoint, which loads, and saving step N again starts over. The next save of any
    step removes it (a resumed run saving at other steps left a checkpoint's size behind)."""
    model, optimizer = _model_and_optimizer(0)
    ckpt = TrainingCheckpointer(tmp_path)
    ckpt.save(2, model, optimizer, {"step": 2})
    at_2 = _params(model)
    _step(model, optimizer, 0)

    def killed(tmp, final, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpointing, "publish_dir", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(4, model, optimizer, {"step": 4})
    monkeypatch.undo()
    assert (tmp_path / ".step_000004.incomplete" / META).is_file()  # written, not published
    assert ckpt.latest() == tmp_path / "step_000002"
    assert ckpt.load(ckpt.latest(), model, optimizer) == {"step": 2}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in at_2.items())

    ckpt.save(4, model, optimizer, {"step": 4})
    assert ckpt.latest() == tmp_path / "step_000004"
    assert not (tmp_path / ".step_000004.incomplete").exists()

    monkeypatch.setattr(checkpointing, "publish_dir", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(6, model, optimizer, {"step": 6})
    monkeypatch.undo()
    ckpt.save(5, model, optimizer, {"step": 5})  # a resume that saves at other steps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000004", "step_000005"]


def test_latest_refuses_a_pointer_to_an_unfinished_folder(tmp_path):
    (tmp_path / "step_000009").mkdir()  # no meta.pt: not complete
    (tmp_path / LATEST).write_text("step_000009")
    assert TrainingCheckpointer(tmp_path).latest() is None


def _two_checkpoints(root):
    """Checkpoints of steps 2 and 4 under ``root`` (``latest``: step_000004)."""
    model, optimizer = _model_and_optimizer(0)
    ckpt = TrainingCheckpointer(root)
    for step in (2, 4):
        _step(model, optimizer, step)
        ckpt.save(step, model, optimizer, {"step": step})
    return ckpt, model, optimizer


def _kill_between_the_renames(ckpt, model, optimizer, monkeypatch):
    """Step 4 saved again (a resume of a finished run), killed after the old step_000004 was
    renamed aside and before the new one was renamed in."""
    real = files.os.rename

    def rename(src, dst):
        if Path(dst).name == "step_000004":
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(files.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(4, model, optimizer, {"step": 4})
    monkeypatch.undo()


FALLBACKS = {  # how the newest checkpoint goes missing -> the one taken, the warning's end
    "latest names a deleted folder": (
        lambda root: shutil.rmtree(root / "step_000004"), 2,
        "skipped '{root}/step_000004': latest names it, but it does not exist"),
    "latest names an unfinished folder": (
        lambda root: (root / "step_000004" / META).unlink(), 2,
        "skipped '{root}/step_000004': it has no meta.pt (unfinished or partly deleted)"),
    "latest missing": (
        lambda root: (root / LATEST).unlink(), 4,
        "'{root}/latest' is missing: the newest checkpoint by step number is taken"),
    "latest empty": (
        lambda root: (root / LATEST).write_text(""), 4,
        "'{root}/latest' is empty: the newest checkpoint by step number is taken"),
}


@pytest.mark.parametrize("case", FALLBACKS)
def test_a_missing_newest_checkpoint_falls_back_to_the_one_before(tmp_path, case):
    """``latest`` naming a folder that is gone or unfinished, or ``latest`` itself gone: the
    newest complete checkpoint by step number is taken, with one line saying what was passed
    over (before, none was: the run started from scratch and dropped its metrics)."""
    damage, step, why = FALLBACKS[case]
    ckpt, model, optimizer = _two_checkpoints(tmp_path)
    damage(tmp_path)
    assert ckpt.latest() == tmp_path / f"step_{step:06d}"
    assert ckpt.newest()[1] == [f"resume_from_checkpoint: {why.format(root=tmp_path)}"]
    assert ckpt.load(ckpt.latest(), model, optimizer) == {"step": step}


def test_a_kill_between_the_renames_of_a_rewritten_checkpoint_resumes_from_the_one_before(
        tmp_path, monkeypatch):
    """The instant between ``publish_dir``'s two renames: ``latest`` names a folder that is
    not there; the one before is taken, and the next save clears what the kill left."""
    ckpt, model, optimizer = _two_checkpoints(tmp_path)
    _kill_between_the_renames(ckpt, model, optimizer, monkeypatch)
    assert ckpt.latest() == tmp_path / "step_000002"
    ckpt.save(6, model, optimizer, {"step": 6})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000002", "step_000006"]


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


DAMAGES = {  # a file of step_000004 damaged -> the warning's end
    "shard deleted": (lambda d: (d / "__0_0.distcp").unlink(), "its __0_0.distcp is missing"),
    "shard truncated": (lambda d: _truncate(d / "__0_0.distcp", 1000),
                        "its __0_0.distcp has 1000 bytes, its tensors need {need} (truncated)"),
    "metadata deleted": (lambda d: (d / ".metadata").unlink(), "its .metadata is missing"),
    "metadata truncated": (lambda d: _truncate(d / ".metadata", 100),
                           "its .metadata does not load (UnpicklingError)"),
    "meta.pt unreadable": (lambda d: (d / META).write_bytes(b"not a pickle"),
                           "its meta.pt does not load (UnpicklingError)"),
}


@pytest.mark.parametrize("case", DAMAGES)
def test_a_damaged_checkpoint_is_skipped_naming_its_file(tmp_path, case):
    """A shard file, DCP's metadata or meta.pt deleted or cut short is found before anything
    is loaded (before, ``dcp.load`` stopped with a traceback): the checkpoint is passed over
    with one line naming it and the file, and the one before is loaded."""
    damage, why = DAMAGES[case]
    ckpt, model, optimizer = _two_checkpoints(tmp_path)
    newest = tmp_path / "step_000004"
    need = (newest / "__0_0.distcp").stat().st_size
    damage(newest)
    assert ckpt.latest() == tmp_path / "step_000002"
    assert ckpt.newest()[1] == [
        f"resume_from_checkpoint: skipped {str(newest)!r}: {why.format(need=need)}"]
    assert ckpt.load(ckpt.latest(), model, optimizer) == {"step": 2}


def test_no_checkpoint_that_loads_is_one_line_naming_the_folder(tmp_path):
    ckpt, _, _ = _two_checkpoints(tmp_path)
    (tmp_path / "step_000004" / "__0_0.distcp").unlink()
    (tmp_path / "step_000002" / ".metadata").unlink()
    with pytest.raises(ConfigError) as err:
        ckpt.latest()
    assert str(err.value) == (
        f"resume_from_checkpoint: no checkpoint in {str(tmp_path)!r} can be loaded "
        f"(step_000004: its __0_0.distcp is missing; and 1 more); delete {str(tmp_path)!r} to "
        f"start over, or choose another output_dir")


def _linears(*widths):
    layers = [torch.nn.Linear(a, b) for a, b in zip(widths, widths[1:])]
    return torch.nn.Sequential(*(m for layer in layers for m in (layer, torch.nn.Tanh())))


MISMATCHES = {  # this run's model and optimizer -> the error's start
    "a wider layer": (
        lambda: _linears(5, 9, 3), torch.optim.AdamW,
        "step_000002's model.0.weight is [7, 5], this run's [9, 5] (and 2 other differences): "
        "student_model"),
    "a layer more": (
        lambda: _linears(5, 7, 3, 3), torch.optim.AdamW,
        "step_000002 has no model.4.weight, which this run's student_model has (and 1 other "
        "difference): student_model"),
    "another optimizer": (
        lambda: _linears(5, 7, 3), lambda params: torch.optim.SGD(params, lr=0.1),
        "step_000002 has no optim.param_groups.0.momentum, which this run's optimizer has (and "
        "19 other differences): optimizer"),
}


@pytest.mark.parametrize("case", MISMATCHES)
def test_a_checkpoint_of_another_model_or_optimizer_is_one_line_naming_the_difference(
        tmp_path, case):
    """Checked against the checkpoint's names and global shapes before anything is loaded
    (before: a traceback from ``dcp.load``, or, for a model with fewer weights than the
    checkpoint's, a load without a word): the first difference, how many others, and the
    config key that changed."""
    build, optim, message = MISMATCHES[case]
    model = _linears(5, 7, 3)
    ckpt = TrainingCheckpointer(tmp_path)
    ckpt.save(2, model, torch.optim.AdamW(model.parameters()), {"step": 2})
    other = build()
    with pytest.raises(ConfigError) as err:
        ckpt.load(ckpt.latest(), other, optim(other.parameters()))
    key = message.rsplit(" ", 1)[1]
    assert str(err.value) == (f"resume_from_checkpoint: {message} differs from the checkpoint's "
                              f"run; resume with its {key}, or start over in another output_dir")


def test_rng_state_round_trip():
    state = rng_state()
    a = torch.rand(5)
    torch.manual_seed(123)
    set_rng_state(state)
    assert torch.equal(torch.rand(5), a)


@pytest.mark.parametrize("saved,put", [
    ("dev1", ("dev1", 1)),  # this process's device's state
    (["dev0", "dev1", "dev2"], ("dev1", 1)),  # a checkpoint of one state per visible GPU
    (["dev0"], None),  # ... saved where fewer GPUs were visible: nothing for this device
    (None, None)])
def test_the_cuda_rng_state_is_this_process_s_device_s(monkeypatch, saved, put):
    """Saved: the current device's CUDA state alone (``get_rng_state_all`` would create a
    context on every visible GPU); restored on the current device, also from a checkpoint of
    one state per GPU, where it holds one for this device. Faked CUDA: the CPU runs it."""
    done = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: "dev1")
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU's"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: done.append(
        (state, device)))
    assert rng_state()["cuda"] == "dev1"
    state = {"torch": torch.get_rng_state(), **({} if saved is None else {"cuda": saved})}
    set_rng_state(state)
    assert done == ([] if put is None else [put])
