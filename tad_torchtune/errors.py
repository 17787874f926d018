"""Errors a user can cause, and how every command of the package reports them: one line on
stderr naming the dotted config key or the file, the value and what is accepted, and a non-zero
exit, with no traceback unless ``TAD_TORCHTUNE_TRACEBACK=1`` is set. The package's own
invariants stay ``assert``s, with their tracebacks.

Under torchrun every process runs the same command and usually meets the same error; on one
node the line is printed once, by rank 0 (``reports_user_errors``)."""

import functools
import gc
import inspect
import json
import os
import re
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: set to 1 to see the traceback of an error a user caused
TRACEBACK_ENV = "TAD_TORCHTUNE_TRACEBACK"
#: exit status of a command stopped by such an error
USER_ERROR_EXIT = 2
#: how long a rank other than 0 waits, after an error a user caused, for torchrun to stop it
#: (which it does once rank 0 exits); a rank still running then prints its own line
OTHER_RANK_GRACE_S = 20.0


class ConfigError(ValueError):
    """An error in what the user gave: a config value, a file, a command-line argument."""


class ReportedElsewhere(Exception):
    """Another process's error, which that process reports: rank 0's, raised on the other ranks
    by ``parallel.on_rank0``, or another rank's stop, seen by a rank waiting for it
    (``parallel.barrier``). ``reports_user_errors`` waits to be stopped, then exits with
    ``status``, printing nothing.

    Args:
        message: what happened, for a traceback (``TAD_TORCHTUNE_TRACEBACK=1``).
        status: the exit status.
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def user_error_types() -> tuple[type[BaseException], ...]:
    from torchtune.config._errors import ConfigError as TorchtuneConfigError
    from torchtune.config._errors import InstantiationError

    return (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
            IsADirectoryError, PermissionError, InstantiationError, TorchtuneConfigError)


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (newlines folded)."""
    text = str(err).strip() or type(err).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def reports_user_errors(prog: str) -> Callable:
    """Decorate a command's entry point: an error the user caused becomes ``prog: error: ...``
    (one line) and exit status 2; anything else propagates with its traceback.

    Launched by torchrun on several processes, the user sees one line, not one per process.
    Every process meets the same error when it comes from the config, and an error rank 0 meets
    in ``parallel.on_rank0`` reaches the others as ``ReportedElsewhere``. Rank 0 prints its line
    and exits; torchrun's agent then stops the other processes on its node with SIGTERM. So
    another rank first waits (``OTHER_RANK_GRACE_S``) to be stopped, silent; if it was not,
    it prints ``prog: error: rank R: ...`` itself: an error of its own (a file missing on its
    node), or one rank 0 took longer to report, or a rank on another node, which its own agent
    does not stop. A ``ReportedElsewhere`` is not printed: the process it came from reports
    its own error (or torchrun's summary names the signal that ended it). While rank 0's line
    is printed, a different error another rank met at the same time is not.
    """

    def wrap(main: Callable) -> Callable:
        @functools.wraps(main)
        def run(*args: Any, **kwargs: Any) -> Any:
            traceback = os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
            try:
                return main(*args, **kwargs)
            except ReportedElsewhere as err:
                if traceback:
                    raise
                _wait_to_be_stopped(OTHER_RANK_GRACE_S)
                raise SystemExit(err.status) from None
            except user_error_types() as err:
                if traceback:
                    raise
                rank = _launched_rank()
                if rank:
                    _wait_to_be_stopped(OTHER_RANK_GRACE_S)
                where = f"rank {rank}: " if rank else ""
                _close_progress_bars()
                print(f"{prog}: error: {where}{one_line(err)}", file=sys.stderr)
                raise SystemExit(USER_ERROR_EXIT) from None

        return run

    return wrap


def _close_progress_bars() -> None:
    """Close the progress bars still open (a harness's, a loop's the error left), so that the
    error's line starts a line of its own instead of following a bar's carriage return."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _launched_rank() -> int:
    """This process's rank in a torchrun launch of several processes (``RANK``); 0 otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    return int(os.environ.get("RANK", "0"))


def _wait_to_be_stopped(seconds: float) -> None:
    """Sleep up to ``seconds``, dying at once of the SIGTERM torchrun's agent sends when another
    process fails (a recipe's own SIGTERM handler, which finishes a training step first, is set
    aside)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(seconds)


_ARG_MESSAGE = re.compile(
    r"^(?P<name>[A-Za-z_]\w*)(?::\s*|\s+(?=(?:must|is|should|has|exceeds)\b))(?P<rest>.*)$", re.S)
_UNEXPECTED = re.compile(r"unexpected keyword argument '(?P<name>\w+)'")
#: Python's "f() missing 2 required keyword-only arguments: 'a' and 'b'"
_MISSING = re.compile(r"missing \d+ required (?:positional |keyword-only )?arguments?: (?P<names>.*)$")


def instantiate(node: Any, key: str, *args: Any, **kwargs: Any) -> Any:
    """``torchtune.config.instantiate(node, *args, **kwargs)`` whose errors name the dotted key:
    a component's ``k must be ..., got 0`` becomes ``kd_loss.k: must be ..., got 0``, an unknown
    argument ``kd_loss.kk: not an argument of tad_torchtune.losses.TADLoss; accepted: ...``.

    Args:
        node: the component's config node.
        key: its dotted key in the config (``kd_loss``, ``dataset``).
    """
    from torchtune import config

    _check_input_files(node, key)
    missing_package = None
    try:
        return config.instantiate(node, *args, **kwargs)
    except ImportError as err:  # what the component imports when built (wandb, tensorboard)
        missing_package = one_line(err)
        # the half-built object goes with the exception, at the end of this clause: its
        # __del__ may fail on what was never set (torchtune's TensorBoardLogger), a second
        # message after the one line, which this hook, until the collection below, drops
        unraisable, sys.unraisablehook = sys.unraisablehook, lambda _: None
    except TypeError as err:
        component = node.get("_component_")
        accepted = _accepted_arguments(component)
        match = _UNEXPECTED.search(str(err))
        if match is not None:
            raise ConfigError(f"{key}.{match['name']}: not an argument of {component}; "
                              f"accepted: {', '.join(accepted)}") from None
        missing = _missing_arguments(str(err), component)
        if not missing:
            raise
        raise ConfigError(f"{', '.join(f'{key}.{name}' for name in missing)}: required by "
                          f"{component}, not set; accepted: {', '.join(accepted)}") from None
    except Exception as err:  # noqa: BLE001
        # A tokenizer is built from the user's files alone, so what fails there is one of them
        # (a truncated download, a file of another kind: sentencepiece's RuntimeError,
        # tokenizers' Exception, a UnicodeDecodeError); TAD_TORCHTUNE_TRACEBACK=1 shows where
        if key.endswith("tokenizer") and (isinstance(err, UnicodeError)
                                          or not isinstance(err, (ValueError, OSError))):
            raise ConfigError(f"{key}: {node.get('_component_')} cannot be built from "
                              f"{input_files(node) or 'its arguments'}: {one_line(err)}"
                              ) from None
        if isinstance(err, (ValueError, FileNotFoundError)):  # its own check, a missing file
            raise ConfigError(_prefixed(one_line(err), key, node)) from None
        raise
    try:
        gc.collect()
    finally:
        sys.unraisablehook = unraisable
    raise ConfigError(f"{key}._component_: {node.get('_component_')} cannot be built here: "
                      f"{missing_package}; accepted: a component whose packages are installed "
                      f"(pip install what it names)")


#: a component argument that names a file to read: ``path``, ``tokenizer_json_path``,
#: ``merges_file``, ...
_FILE_ARGUMENT = re.compile(r"(^|_)(path|file)$")


def input_files(node: Any) -> dict[str, str]:
    """A component node's file arguments (``_FILE_ARGUMENT``) that are set to a path."""
    if not hasattr(node, "items"):
        return {}
    return {name: value for name, value in node.items()
            if isinstance(name, str) and _FILE_ARGUMENT.search(name) and isinstance(value, str)
            and value}


def _check_input_files(node: Any, key: str) -> None:
    """Refuse, in one line, a file argument whose file is missing (a tokenizer's ``path`` when
    the checkpoint's download went elsewhere): sentencepiece and tokenizers would raise their
    own errors, with no key."""
    for name, value in input_files(node).items():
        if not Path(value).expanduser().exists():
            raise ConfigError(f"{key}.{name}: no file at {value!r}; accepted: the path of an "
                              f"existing file")


def _parameters(component: str | None) -> dict[str, inspect.Parameter]:
    """The parameters of the component a ``_component_`` dotpath names; none when it cannot
    be imported (its own error says more)."""
    try:
        from torchtune.config._utils import _get_component_from_path

        return dict(inspect.signature(_get_component_from_path(component)).parameters)
    except Exception:  # the component cannot be imported: say nothing more
        return {}


def _accepted_arguments(component: str | None) -> list[str]:
    return [n for n, p in _parameters(component).items()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n != "self"]


def _missing_arguments(message: str, component: str | None) -> list[str]:
    """The arguments a ``TypeError``'s "missing N required ... argument(s)" names, when they are
    the component's own arguments without a default (not those of a call deeper inside it)."""
    match = _MISSING.search(message)
    if match is None:
        return []
    names = re.findall(r"'(\w+)'", match["names"])
    params = _parameters(component)
    own = all(n in params and params[n].default is inspect.Parameter.empty for n in names)
    return names if names and own else []


def _prefixed(message: str, key: str, node: Any) -> str:
    """``message`` with the dotted key in front: a message that starts by naming one of the
    component's arguments (``k must be ...``, ``dataset.source: ...``) gets ``key.argument: ``."""
    if message.startswith(f"{key}.") or message.startswith(f"{key}:"):
        return message
    names = set(node.keys()) | set(_accepted_arguments(node.get("_component_")))
    head = message
    for generic in ("dataset.", "model.", "tokenizer."):  # a component naming its own kind
        head = head.removeprefix(generic)
    match = _ARG_MESSAGE.match(head)
    if match and match["name"] in names:
        return f"{key}.{match['name']}: {match['rest']}"
    dotted = re.match(r"(\w+)\.\w", head)  # an argument's own key: teacher.scale_factor: ...
    if dotted and dotted[1] in names:
        return f"{key}.{head}"
    return f"{key}: {message}"


def check_checkpoint_files(node: Any, key: str) -> None:
    """Check, before torchtune loads them, that the files of a checkpointer node exist and that
    every ``.safetensors`` file is whole (its header parses and its tensors fit in the file), so
    a missing or truncated file is reported by name instead of by torchtune's "Unable to load".

    Raises:
        ConfigError: naming ``key``, the file and what is wrong with it.
    """
    folder = Path(str(node.get("checkpoint_dir", ""))).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{key}.checkpoint_dir: {str(folder)!r} is not a folder")
    files = node.get("checkpoint_files") or []
    if isinstance(files, str):
        raise ConfigError(f"{key}.checkpoint_files: a list of file names (or torchtune's "
                          f"{{filename_format, max_filename}}), got the string {files!r}; "
                          f"write [{files}]")
    if hasattr(files, "keys"):
        return  # torchtune's {filename_format, max_filename} form: left to torchtune
    for name in list(files):
        path = folder / str(name)
        if not path.is_file():
            raise ConfigError(f"{key}.checkpoint_files: {str(path)!r} does not exist")
        if path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
            if problem:
                raise ConfigError(f"{key}.checkpoint_files: {str(path)!r} is not a readable "
                                  f"safetensors file: {problem}")


def _safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file, or None: an 8-byte little-endian header length,
    a JSON header, then the tensor data whose offsets the header gives."""
    size = path.stat().st_size
    if size < 8:
        return f"{size} bytes, shorter than its 8-byte header length"
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if 8 + header_len > size:
            return f"its header is {header_len} bytes but the file has {size}: truncated"
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "its header is not JSON"
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    need = 8 + header_len + max(ends, default=0)
    if need > size:
        return f"its tensors need {need} bytes, the file has {size}: truncated"
    return None
