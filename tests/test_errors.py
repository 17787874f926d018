"""Errors a user can cause (``errors.py``): a command's one line and exit status 2, the dotted key
put in front of a component's message, and checkpoint files checked before torchtune reads
them. (The recipes' messages end to end: ``tests/recipes/``.)"""

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from tad_torchtune import errors
from tad_torchtune.errors import (
    TRACEBACK_ENV,
    USER_ERROR_EXIT,
    ConfigError,
    ReportedElsewhere,
    check_checkpoint_files,
    instantiate,
    one_line,
    reports_user_errors,
)


def widget(*, size: int = 1, source: str = "") -> dict:
    """A component for ``instantiate`` (``tests.test_errors.widget``)."""
    if source == "deeper":  # a call inside the component misses an argument
        def inner(needed):
            return needed

        inner()
    if size < 1:
        raise ValueError(f"size must be an integer >= 1, got {size}")
    if source == "nowhere":
        raise ValueError("dataset.source: 'nowhere' does not exist")
    if source == "odd":
        raise ValueError("something else went wrong")
    if source == "boom":
        raise RuntimeError("a bug")
    return {"size": size}


def test_one_line_folds_a_message():
    assert one_line(ValueError("first\n  second\n\nthird ")) == "first second third"
    assert one_line(KeyError()) == "KeyError"


def test_reports_user_errors(monkeypatch, capsys):
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)

    @reports_user_errors("tad_x")
    def main(error):
        raise error

    with pytest.raises(SystemExit) as stopped:
        main(ConfigError("batch_size: must be an integer >= 1,\ngot 0"))
    assert stopped.value.code == USER_ERROR_EXIT == 2
    assert capsys.readouterr().err == "tad_x: error: batch_size: must be an integer >= 1, got 0\n"
    with pytest.raises(SystemExit):
        main(FileNotFoundError("no such file: 'a.yaml'"))
    assert capsys.readouterr().err == "tad_x: error: no such file: 'a.yaml'\n"
    with pytest.raises(RuntimeError, match="a bug"):  # not the user's: its traceback
        main(RuntimeError("a bug"))
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(ConfigError, match="batch_size"):  # asked for: the traceback
        main(ConfigError("batch_size: must be an integer >= 1, got 0"))
    monkeypatch.setenv(TRACEBACK_ENV, "0")
    with pytest.raises(SystemExit):
        main(ConfigError("x: y"))


def test_under_torchrun_rank_0_prints_and_another_rank_waits_to_be_stopped(monkeypatch, capsys):
    """Every process of a torchrun launch meets the same error: rank 0 prints the line at once;
    another rank first waits to be stopped (torchrun's agent does so when rank 0 exits), with
    SIGTERM's default action, and prints its own line, naming its rank, only if it was not. An
    error another process reports (``ReportedElsewhere``) is never printed, on any rank."""
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    monkeypatch.setattr(errors, "OTHER_RANK_GRACE_S", 0.3)
    handlers = []
    monkeypatch.setattr(errors.signal, "signal", lambda *a: handlers.append(a))

    @reports_user_errors("tad_x")
    def main(error):
        raise error

    def stop(error, rank):
        monkeypatch.setenv("RANK", rank)
        handlers.clear()
        start = time.perf_counter()
        with pytest.raises(SystemExit) as stopped:
            main(error)
        return stopped.value.code, time.perf_counter() - start, capsys.readouterr().err

    monkeypatch.setenv("WORLD_SIZE", "2")
    user = ConfigError("batch_size: must be an integer >= 1, got 0")
    code, seconds, err = stop(user, "0")
    assert (code, err, handlers) == (USER_ERROR_EXIT, "tad_x: error: batch_size: must be an "
                                     "integer >= 1, got 0\n", [])
    assert seconds < 0.3
    code, seconds, err = stop(user, "1")
    assert (code, err) == (USER_ERROR_EXIT, "tad_x: error: rank 1: batch_size: must be an "
                           "integer >= 1, got 0\n")
    assert seconds >= 0.3 and handlers == [(signal.SIGTERM, signal.SIG_DFL)]
    for rank in ("0", "1"):
        code, seconds, err = stop(ReportedElsewhere("rank 0 failed: x", status=3), rank)
        assert (code, err, handlers) == (3, "", [(signal.SIGTERM, signal.SIG_DFL)])
        assert seconds >= 0.3
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(ReportedElsewhere, match="rank 0 failed"):
        main(ReportedElsewhere("rank 0 failed: x", status=3))
    monkeypatch.delenv(TRACEBACK_ENV)
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: RANK means nothing
    code, seconds, err = stop(user, "1")
    assert err.startswith("tad_x: error: batch_size") and seconds < 0.3


def test_a_waiting_rank_dies_of_sigterm_at_once_and_silently(tmp_path):
    """torchrun's agent stops the other processes with SIGTERM: a waiting rank dies of it at
    once, without a line, even where the recipe had made SIGTERM finish the step first."""
    import select

    script = tmp_path / "rank1.py"
    script.write_text(textwrap.dedent("""
        import signal, time, types
        from tad_torchtune import errors
        from tad_torchtune.errors import ConfigError, reports_user_errors
        signal.signal(signal.SIGTERM, lambda *_: None)  # as tad_distill's preemption handler

        def sleep(seconds):
            print("waiting", flush=True)
            time.sleep(seconds)

        errors.time = types.SimpleNamespace(sleep=sleep)

        @reports_user_errors("tad_x")
        def main():
            raise ConfigError("batch_size: must be an integer >= 1, got 0")

        main()
    """))
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1"}
    env.pop(TRACEBACK_ENV, None)
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready and proc.stdout.readline() == "waiting\n"
        start = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGTERM
    assert time.perf_counter() - start < errors.OTHER_RANK_GRACE_S / 2
    assert "error" not in err, err


@pytest.mark.parametrize("node,message", [
    ({"size": 0}, "part.size: must be an integer >= 1, got 0"),
    ({"sise": 2}, "part.sise: not an argument of tests.test_errors.widget; accepted: size, "
                  "source"),
    ({"source": "nowhere"}, "part.source: 'nowhere' does not exist"),  # "dataset." dropped
    ({"source": "odd"}, "part: something else went wrong"),
])
def test_instantiate_names_the_dotted_key(node, message):
    component = {"_component_": "tests.test_errors.widget"}
    assert instantiate(OmegaConf.create({**component, "size": 3}), "part") == {"size": 3}
    with pytest.raises(ConfigError) as err:
        instantiate(OmegaConf.create({**component, **node}), "part")
    assert str(err.value) == message


def gadget(name: str, source: str, *, size: int = 1) -> dict:
    """A component with required arguments (``tests.test_errors.gadget``)."""
    return {"name": name, "source": source, "size": size}


def test_a_missing_required_argument_is_one_line():
    """A component's required argument left out of its node (``~dataset.source``) is named with
    its dotted key, one or several; a TypeError of a call inside the component stays one."""
    component = {"_component_": "tests.test_errors.gadget"}
    assert instantiate(OmegaConf.create({**component, "name": "a", "source": "b"}), "part") == {
        "name": "a", "source": "b", "size": 1}
    for node, missing in (({"name": "a"}, "part.source"),
                          ({"size": 2}, "part.name, part.source")):
        with pytest.raises(ConfigError) as err:
            instantiate(OmegaConf.create({**component, **node}), "part")
        assert str(err.value) == (f"{missing}: required by tests.test_errors.gadget, not set; "
                                  "accepted: name, source, size")
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'needed'"):
        instantiate(OmegaConf.create({"_component_": "tests.test_errors.widget",
                                      "source": "deeper"}), "part")


TOKENIZERS = {  # component, its file arguments
    "torchtune.models.gemma.gemma_tokenizer": ("path",),  # sentencepiece
    "torchtune.models.qwen2_5.qwen2_5_tokenizer": ("path", "merges_file"),
    "torchtune.modules.transforms.tokenizers.HuggingFaceBaseTokenizer":  # tokenizers
        ("tokenizer_json_path", "tokenizer_config_json_path"),
}


@pytest.mark.parametrize("component", sorted(TOKENIZERS))
def test_a_tokenizer_s_missing_or_unreadable_file_is_one_line(component, tmp_path):
    """A tokenizer's file that is not there (a download elsewhere) is named with its key before
    the tokenizer is built; one its library cannot read (truncated, of another kind) is named
    with the tokenizer's key, not sentencepiece's or tokenizers' traceback."""
    files = {name: str(tmp_path / f"{name}.bin") for name in TOKENIZERS[component]}
    node = OmegaConf.create({"_component_": component, **files})
    first = TOKENIZERS[component][0]
    with pytest.raises(ConfigError) as err:
        instantiate(node, "teacher_tokenizer")
    assert str(err.value) == (f"teacher_tokenizer.{first}: no file at {files[first]!r}; "
                              f"accepted: the path of an existing file")
    for path in files.values():
        with open(path, "wb") as f:
            f.write(b"\x00not a tokenizer\xff" * 8)
    with pytest.raises(ConfigError) as err:
        instantiate(node, "teacher_tokenizer")
    message = str(err.value)
    assert message.startswith(f"teacher_tokenizer: {component} cannot be built from {files}: ")
    assert "\n" not in message, message


def test_a_component_s_unexpected_error_keeps_its_traceback_outside_tokenizers():
    node = OmegaConf.create({"_component_": "tests.test_errors.widget", "source": "boom"})
    with pytest.raises(RuntimeError, match="a bug"):
        instantiate(node, "part")
    with pytest.raises(ConfigError, match="^tokenizer: tests.test_errors.widget cannot be built "
                                          "from its arguments: a bug$"):
        instantiate(node, "tokenizer")


class LoggerOfAMissingPackage:
    """A component that imports an uninstalled package when built, and whose ``__del__`` then
    fails, as torchtune's TensorBoardLogger without tensorboard does."""

    def __init__(self, log_dir: str = "") -> None:
        import tad_torchtune_no_such_package  # noqa: F401

    def __del__(self) -> None:
        self._writer.close()


def test_a_component_missing_a_package_is_one_line_and_nothing_after(monkeypatch):
    """Built without a package it imports (W&B's or TensorBoard's logger without wandb or
    tensorboard): one line naming the key (a traceback before, and the half-built object's
    failing ``__del__`` printed a second one)."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    node = OmegaConf.create({"_component_": "tests.test_errors.LoggerOfAMissingPackage"})
    with pytest.raises(ConfigError) as err:
        instantiate(node, "metric_logger")
    assert str(err.value) == (
        "metric_logger._component_: tests.test_errors.LoggerOfAMissingPackage cannot be built "
        "here: No module named 'tad_torchtune_no_such_package'; accepted: a component whose "
        "packages are installed (pip install what it names)")
    import gc

    gc.collect()
    assert unraisable == [] and sys.unraisablehook == unraisable.append


def _safetensors(path, n=64):
    save_file({"w": torch.arange(n, dtype=torch.float32)}, str(path))
    return path.stat().st_size


def test_checkpoint_files_are_checked_before_loading(tmp_path):
    key = "teacher_checkpointer"
    good = tmp_path / "good.safetensors"
    size = _safetensors(good)
    check_checkpoint_files({"checkpoint_dir": str(tmp_path), "checkpoint_files": [good.name]}, key)
    check_checkpoint_files({"checkpoint_dir": str(tmp_path),  # torchtune's own form: its check
                            "checkpoint_files": {"filename_format": "x", "max_filename": "2"}}, key)

    def problem(files, folder=tmp_path):
        with pytest.raises(ConfigError) as err:
            check_checkpoint_files({"checkpoint_dir": str(folder), "checkpoint_files": files}, key)
        return str(err.value)

    assert problem([], tmp_path / "none") == (f"{key}.checkpoint_dir: "
                                              f"{str(tmp_path / 'none')!r} is not a folder")
    assert problem(["gone.safetensors"]) == (f"{key}.checkpoint_files: "
                                             f"{str(tmp_path / 'gone.safetensors')!r} does not exist")
    data = good.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    cases = {
        "tiny": (data[:5], "5 bytes, shorter than its 8-byte header length"),
        "short_header": (data[:8 + header_len - 1], f"its header is {header_len} bytes but the "
                                                    f"file has {8 + header_len - 1}: truncated"),
        "not_json": (data[:8] + b"\xff" * header_len + data[8 + header_len:],
                     "its header is not JSON"),
        "short_data": (data[:-4], f"its tensors need {size} bytes, the file has {size - 4}: "
                                  f"truncated"),
    }
    for name, (content, why) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        assert problem([good.name, path.name]) == (
            f"{key}.checkpoint_files: {str(path)!r} is not a readable safetensors file: {why}")
    assert json.loads(data[8:8 + header_len])["w"]["data_offsets"] == [0, 256]
