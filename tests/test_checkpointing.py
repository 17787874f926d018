"""Training checkpoints (``checkpointing.py``) on one process: model and optimizer come back
exactly (the next step equals the uninterrupted one), ``latest`` names the newest complete
checkpoint and never a half-written one, and only the last ``keep_last`` are kept. (Resuming a
whole run, on one or two processes: ``tests/recipes/test_tad_distill.py``.)"""

import warnings

import pytest
import torch

from tad_torchtune import checkpointing
from tad_torchtune.checkpointing import (
    LATEST,
    META,
    TrainingCheckpointer,
    rng_state,
    set_rng_state,
)

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
    previous checkpoint, which loads, and saving step N again starts over."""
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


def test_latest_refuses_a_pointer_to_an_unfinished_folder(tmp_path):
    (tmp_path / "step_000009").mkdir()  # no meta.pt: not complete
    (tmp_path / LATEST).write_text("step_000009")
    assert TrainingCheckpointer(tmp_path).latest() is None


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
