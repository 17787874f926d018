"""What the recipe tests (``tests/recipes/``) run on, all made locally: a BPE tokenizer trained on
the shipped corpus, a random llama3-family teacher written as a Hugging Face checkpoint, a config;
and how they run a recipe (``tune run`` in a subprocess) and read its outputs. (The tiny teachers
of every model family are ``tests/helpers/teachers.py``.)"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

CORPUS = Path(__file__).parents[1] / "assets" / "corpus.jsonl"
VOCAB = 256
TEACHER = {
    "_component_": "torchtune.models.llama3.llama3",
    "vocab_size": VOCAB,
    "num_layers": 4,
    "num_heads": 4,
    "num_kv_heads": 2,
    "embed_dim": 32,
    "max_seq_len": 64,
    "intermediate_dim": 64,
}


def make_tokenizer(folder: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|bos|>", "<|eos|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    docs = [json.loads(line)["text"] for line in CORPUS.read_text(encoding="utf-8").splitlines()]
    tok.train_from_iterator(docs, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|bos|>", "eos_token": "<|eos|>"})
    )
    return folder


def make_teacher_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A random tiny llama3 teacher saved in Hugging Face format (LlamaForCausalLM)."""
    from torchtune.config._utils import _get_component_from_path
    from torchtune.models.convert_weights import tune_to_hf

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in TEACHER.items() if k != "_component_"}
    model = _get_component_from_path(TEACHER["_component_"])(**kwargs)
    with torch.no_grad():  # a less flat teacher than the default init: a real tail to distil
        model.output.weight.mul_(8.0)
    sd = tune_to_hf(model.state_dict(), num_heads=4, num_kv_heads=2, dim=32)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "vocab_size": VOCAB, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu",
        "torch_dtype": "float32", "bos_token_id": 0, "eos_token_id": 1,
    }))
    return folder


def make_assets(root: Path) -> dict[str, Path]:
    tokenizer = make_tokenizer(root / "tokenizer")
    teacher = make_teacher_checkpoint(root / "teacher")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a self-contained checkpoint
        shutil.copyfile(tokenizer / name, teacher / name)
    return {"tokenizer": tokenizer, "teacher": teacher}


def base_config(assets: dict[str, Path], output_dir: Path, **overrides) -> dict:
    tok = assets["tokenizer"]
    dataset = {
        "_component_": "tad_torchtune.data.text_block_dataset",
        "source": str(CORPUS), "max_seq_len": 32, "validation_fraction": 0.1,
    }
    cfg = {
        "output_dir": str(output_dir),
        "seed": 1234,
        "device": "cpu",
        "dtype": "fp32",
        "tokenizer": {
            "_component_": "torchtune.modules.transforms.tokenizers.HuggingFaceBaseTokenizer",
            "tokenizer_json_path": str(tok / "tokenizer.json"),
            "tokenizer_config_json_path": str(tok / "tokenizer_config.json"),
        },
        "dataset": {**dataset, "split": "train"},
        "validation_dataset": {**dataset, "split": "validation", "max_blocks": 8},
        "batch_size": 8,
        "gradient_accumulation_steps": 1,
        "teacher_model": dict(TEACHER),
        "teacher_checkpointer": {
            "_component_": "torchtune.training.FullModelHFCheckpointer",
            "checkpoint_dir": str(assets["teacher"]),
            "checkpoint_files": ["model.safetensors"],
            "model_type": "LLAMA3",
            "output_dir": str(output_dir / "teacher_checkpointer"),
        },
        "student_model": {
            "_component_": "tad_torchtune.models.pruned_student",
            "teacher": "${teacher_model}",
            "num_layers": 2,
            "intermediate_dim": 48,
        },
        "kd_loss": {"_component_": "tad_torchtune.losses.TADLoss", "k": 5, "beta": 2.0},
        "clm_weight": 1.0,
        "kd_weight": 1.0,
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 3e-3, "weight_decay": 0.0},
        "lr_scheduler": {
            "_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
            "num_warmup_steps": 2,
        },
        "clip_grad_norm": 1.0,
        "epochs": 1,
        "max_steps": 10,
        "log_every_n_steps": 1,
        "loss_chunk_size": 64,
        "metric_logger": {
            "_component_": "torchtune.training.metric_logging.DiskLogger",
            "log_dir": str(output_dir / "logs"),
        },
    }
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def tune_bin() -> str:
    """The ``tune`` beside this interpreter (a virtual environment), else the one on PATH (a
    ``pip install --target`` puts it in the target's ``bin/``, as benchmarks/gpu_check.sh does)."""
    beside = Path(sys.executable).parent / "tune"
    return str(beside) if beside.is_file() else shutil.which("tune") or str(beside)


def run_tune(args: list[str], cwd: Path, timeout: int = 600, check: bool = True,
             nproc: int = 1, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``tune run [--nproc_per_node N] ARGS`` from ``cwd`` (outside the checkout), with ``env``
    added to this process's environment."""
    launch = [tune_bin(), "run"]
    if nproc > 1:
        launch += ["--nproc_per_node", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(launch + args, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"tune run failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc


def two_ranks(script: Path, args: list[str], cwd: Path, timeout: int = 300
              ) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """``script ARGS`` on two CPU processes under ``torch.distributed.run`` (from ``cwd``, the
    checkout on ``PYTHONPATH``), which must succeed; with what each rank wrote to
    ``cwd/rank<r>.json``."""
    path = os.pathsep.join(p for p in (str(Path(__file__).parents[2]),
                                       os.environ.get("PYTHONPATH")) if p)  # the checkout first
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, [json.loads((Path(cwd) / f"rank{r}.json").read_text()) for r in (0, 1)]


def read_metrics(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(output_dir) if "loss" in r}


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``NAME: error: ...`` line of a command stopped by an error the user caused (exit 2,
    no traceback)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def bundled_config_path(name: str) -> Path:
    """The file of a config shipped with the package (``--config NAME`` of ``tune run``)."""
    from tad_torchtune.schema import resolve_config_argv

    return Path(resolve_config_argv(["", "--config", name])[2])


def run_in_process(recipe: str, args: list[str], monkeypatch) -> None:
    """``tune run RECIPE ARGS`` in this process: the recipe's ``recipe_main`` (torchtune's
    ``config.parse`` of ``--config PATH key=value ...`` and ``reports_user_errors``) with
    ``sys.argv`` as ``tune run`` sets it. Errors a user causes end in ``SystemExit(2)``."""
    import importlib

    from tad_torchtune.errors import TRACEBACK_ENV

    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", [recipe, *args])
    try:
        importlib.import_module(recipe).recipe_main()
    except SystemExit as stopped:  # config.parse ends a run that went well with sys.exit(None)
        if stopped.code not in (None, 0):
            raise


def user_error(recipe: str, args: list[str], monkeypatch, capsys) -> str:
    """The one ``RECIPE: error: ...`` line of ``run_in_process``, which must exit with 2 and no
    traceback, as ``one_error_line`` checks a subprocess."""
    import pytest

    from tad_torchtune.errors import USER_ERROR_EXIT

    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run_in_process(recipe, args, monkeypatch)
    err = capsys.readouterr().err
    assert stopped.value.code == USER_ERROR_EXIT, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err[-3000:]
    return errors[0]


def run_recipe(recipe: str, cfg: dict) -> None:
    """A whole run of ``recipe`` (its ``run(cfg)``: check, set up, run, clean up) in this process,
    single-threaded as ``run_tune`` runs it (``OMP_NUM_THREADS=1``): the run of ``tune run``
    without the start of a new interpreter (the ``tune run`` path itself is tested once per
    recipe)."""
    import importlib

    from omegaconf import OmegaConf

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        importlib.import_module(recipe).run(OmegaConf.create(cfg))
    finally:
        torch.set_num_threads(threads)
