"""Dress rehearsals of the shipped training configs: every ``configs/*.yaml`` that ``tad_distill``
reads (found on disk, so a new config is rehearsed without editing this file), run as a user runs
it, in this process (each ``recipes/*.py``'s ``run(cfg)`` is its ``tune run`` on a parsed config):

    tune run tad_prepare --config NAME          the token stores (every config but the SFT ones)
    tune run tad_distill --config NAME          3 steps: a checkpoint (and its export) at step 2
    tune run tad_distill --config NAME resume_from_checkpoint=true
                                                in a copy of the folder as a kill right after
                                                step 2's checkpoint leaves it: step 3 again, the
                                                same metrics and the same exported student
    tune run tad_eval --config demo_eval tokenizer=... dataset=... teacher.checkpoint_dir=...
        students.student.checkpoint_dir=...     the KL and CE of the run's final validation

then ``transformers`` opens the export with the logits of the project's loader; the demo also runs
``tune run tad_cache --config demo teacher_cache_dir=DIR cache_mode=sampled`` and
``tune run tad_distill --config demo teacher_cache_dir=DIR``.

What differs from the shipped file is only this (``rehearsal_changes`` checks it key by key on the
difference of the two configs, against ``ALLOWED_CHANGES``):

- model sizes: the teacher's builder node becomes its family's component builder with every width
  divided by the largest factor that leaves each head two whole rotary pairs
  (``tests.helpers.teachers.shrink_config``: Qwen2.5-3B -> 64 wide, 16 heads of 4), the vocabulary
  ``256 + V % 256`` (a larger teacher vocabulary stays larger); depths, head counts, layer choices
  and every other builder argument are kept (checked). A ``pruned_student`` keeps its node but its
  widths, divided by its teacher's factor; another student builder is shrunk like a teacher. The
  demo's packaged teacher is small already and has real weights: it is rehearsed as shipped.
- paths: every absolute path (and the demo's packaged corpus) moves under the test's folder, where
  the test writes what the config names there: tokenizer files of the config's kind (a byte-level
  BPE ``vocab.json``/``merges.txt``, a SentencePiece ``tokenizer.model``, a ``tokenizer.json``)
  trained on the Jargon File excerpt of ``tests/assets`` with ids that fit the tiny models;
  Hugging Face checkpoint folders (the family's ``config.json``, the weights split over the files
  ``checkpoint_files`` names, ``.bin`` and ``{filename_format, max_filename}`` included); a few KB
  of corpus in the format each ``source`` / ``data_files`` names (parquet, JSON lines with the
  ``column_map`` columns). One key is added: the tiny Qwen vocabulary cannot hold Qwen's special
  tokens at ids 151643+, so ``tokenizer.special_tokens_path`` names the tiny ``tokenizer.json``
  that holds them after its vocabulary, as a Qwen checkpoint folder's does.
- step counts and step sizes: ``max_steps`` 3, checkpoints every 2 steps, validation at the end,
  a log line per step, one warm-up step (the learning rate is then non-zero from step 2 on),
  ``batch_size`` 2 x ``gradient_accumulation_steps`` 1, blocks of 32 tokens, instruct samples
  of at most 48.
- the machine: the bf16 / cuda configs are rehearsed on the CPU in fp32, ``compile: false``
  (inductor on a CPU costs minutes; tests/recipes/test_distill_recipe.py compares compiled with
  eager). Fused AdamW, the fused head and activation checkpointing run as shipped.
"""

import fnmatch
import gzip
import json
import math
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from tad_torchtune.models import (
    build_model,
    forward_hidden,
    output_weight,
    project_logits,
    resolve_teacher,
    save_hf_checkpoint,
    vocab_size_of,
)
from tad_torchtune.models.loading import load_hf_folder
from tests.helpers import teachers as tiny_models
from tests.helpers.configs import CONFIG_DIR, TEXT_BLOCKS, TRAINING_CONFIGS
from tests.helpers.teachers import PRUNED_STUDENT, WIDTHS, shrink_config

CORPUS = Path(__file__).resolve().parents[1] / "assets" / "corpus.jsonl"
DATASET_KEYS = ("dataset", "validation_dataset")
CHECKPOINTERS = (("teacher_checkpointer", "teacher_model", 0),
                 ("student_checkpointer", "student_model", 1))
BLOCK = 32  # tokens per text block
SFT_MAX_SEQ_LEN = 48  # tokens per instruct sample, below the tiny models' RoPE cache

# The rehearsal's settings, besides sizes and paths.
STEPS = {"max_steps": 3, "save_every_n_steps": 2, "eval_every_n_steps": 3,
         "log_every_n_steps": 1, "lr_scheduler.num_warmup_steps": 1}
STEP_SIZE = {"batch_size": 2, "gradient_accumulation_steps": 1}
MACHINE = {"device": "cpu", "dtype": "fp32", "compile": False}

# key pattern -> why the rehearsal may change it (besides absolute paths moved under the test's
# folder, checked exactly in ``rehearsal_changes``).
ALLOWED_CHANGES = {
    "teacher_model": "model sizes: the builder node as its family's component builder",
    "teacher_model.*": "model sizes",
    "*.max_seq_len": "block and sample lengths; the RoPE cache of the tiny models",
    "*tokenizer.special_tokens_path": "the tiny Qwen vocabulary's special tokens",
    "output_dir": "a run of its own (the resumed copy, the cached run)",
    "max_steps": "step counts",
    "save_every_n_steps": "step counts",
    "eval_every_n_steps": "step counts",
    "log_every_n_steps": "step counts",
    "lr_scheduler.num_warmup_steps": "step counts",
    "resume_from_checkpoint": "the resumed run",
    "batch_size": "step sizes",
    "gradient_accumulation_steps": "step sizes",
    "device": "rehearsed on the CPU",
    "dtype": "rehearsed in fp32",
    "compile": "no inductor on the CPU",
    "teacher_id_merges.*": "the same ids past the tiny student vocabulary's end",
}
# a pruned student keeps its node but its widths; any other student builder is shrunk whole
PRUNED_CHANGES = {f"student_model.{key}": "model sizes" for key in WIDTHS}
BUILDER_CHANGES = {"student_model": "model sizes", "student_model.*": "model sizes"}
# what a tiny model keeps of the shipped one: every builder argument but these
SIZE_ARGS = {"vocab_size", "max_seq_len", *WIDTHS}
CACHE = {"teacher_cache_dir": "tad_cache's output", "cache_mode": "the sampled cache"}

QWEN_TOKENIZERS = {"torchtune.models.qwen2.qwen2_tokenizer",
                   "torchtune.models.qwen2_5.qwen2_5_tokenizer"}
SPM_TOKENIZERS = {"torchtune.models.llama2.llama2_tokenizer",
                  "torchtune.models.phi3.phi3_mini_tokenizer",
                  "torchtune.models.gemma.gemma_tokenizer",
                  "torchtune.models.mistral.mistral_tokenizer"}
HF_TOKENIZER = "torchtune.modules.transforms.tokenizers.HuggingFaceBaseTokenizer"
PACKAGED_TOKENIZERS = {"tad_torchtune.demo.demo_tokenizer"}


def load_shipped(name: str) -> DictConfig:
    return OmegaConf.load(CONFIG_DIR / f"{name}.yaml")


def _reroot(path: str, root: Path) -> str:
    """An absolute path, or a packaged corpus (``pkg://``), moved under ``root``."""
    if path.startswith("pkg://"):
        return str(root / "pkg" / path.removeprefix("pkg://"))
    return str(root / path.lstrip("/"))


def _packaged_teacher(cfg: DictConfig) -> bool:
    return str(cfg.teacher_checkpointer.checkpoint_dir).startswith("pkg://")


def _is_sft(cfg: DictConfig) -> bool:
    return cfg.dataset._component_ != TEXT_BLOCKS


# ------------------------------------------------------------------------------ the overrides


def rehearsal_config(shipped: DictConfig, root: Path) -> DictConfig:
    """The shipped config with tiny models, its paths under ``root``, 3 steps of 2 blocks on the
    CPU in fp32 (the module docstring says what changes and why)."""
    # a packaged teacher (the demo's) is small already and has real weights: kept as shipped
    cfg = shipped if _packaged_teacher(shipped) else shrink_config(shipped, shrink=None)

    def reroot(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: reroot(v) for k, v in node.items()}
        if isinstance(node, list):
            return [reroot(v) for v in node]
        return _reroot(node, root) if isinstance(node, str) and node.startswith("/") else node

    cfg = OmegaConf.create(reroot(OmegaConf.to_container(cfg, resolve=False)))
    for key, value in {**MACHINE, **STEPS, **STEP_SIZE}.items():
        if key == "compile" and key not in cfg or key.startswith("lr_scheduler") and \
                cfg.get("lr_scheduler") is None:
            continue
        OmegaConf.update(cfg, key, value)
    for key in DATASET_KEYS:
        node = cfg.get(key)
        if node is not None and node._component_ == TEXT_BLOCKS:
            node.max_seq_len = BLOCK
            if isinstance(node.source, str) and node.source.startswith("pkg://"):
                node.source = _reroot(node.source, root)  # a copy of a few KB written here
    if _is_sft(cfg):
        cfg.tokenizer.max_seq_len = SFT_MAX_SEQ_LEN
    for key in ("tokenizer", "teacher_tokenizer"):
        node = cfg.get(key)
        if node is not None and node._component_ in QWEN_TOKENIZERS:
            node.special_tokens_path = str(Path(node.path).parent / "tokenizer.json")
    return cfg


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """Leaf values by dotted key (lists are leaves), interpolations unresolved."""
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=False)
    if isinstance(node, dict) and node:
        out = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def rehearsal_changes(shipped: DictConfig, cfg: DictConfig, root: Path,
                      extra: dict[str, str] | None = None) -> dict[str, str]:
    """Every key where ``cfg`` differs from ``shipped``, with the reason it may; fails on a
    change that is none of the allowed ones (an absolute path moved under ``root``, a key of
    ``ALLOWED_CHANGES`` or ``extra``), and on a tiny model of another family or with other
    builder arguments than its sizes."""
    pruned = shipped.student_model._component_ == PRUNED_STUDENT
    allowed = {**ALLOWED_CHANGES, **(PRUNED_CHANGES if pruned else BUILDER_CHANGES),
               **(extra or {})}
    old, new = _flat(shipped), _flat(cfg)
    missing = object()
    why = {}
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, missing), new.get(key, missing)
        if before == after:
            continue
        if isinstance(before, str) and before.startswith(("/", "pkg://")) and \
                after == _reroot(before, root):
            why[key] = "path under the test's folder"
            continue
        reason = next((r for pattern, r in allowed.items() if fnmatch.fnmatchcase(key, pattern)),
                      None)
        assert reason is not None, (
            f"the rehearsal changed {key!r} ({before!r} -> {after!r}): not a size, path, step "
            f"count or machine setting; rehearse the shipped value")
        why[key] = reason
    models = [] if _packaged_teacher(shipped) else ["teacher_model"]
    models += [] if pruned else ["student_model"]
    for key in models:
        (real_family, real), (tiny_family, tiny) = (resolve_teacher(c[key]) for c in (shipped, cfg))
        assert tiny_family is real_family, (key, tiny_family.name, real_family.name)
        kept = {k: v for k, v in real.items() if k not in SIZE_ARGS}
        assert {k: tiny[k] for k in kept} == kept, key
    return why


# ------------------------------------------------------------------- what the config names


@cache
def _documents() -> tuple[str, ...]:
    return tuple(json.loads(line)["text"] for line in CORPUS.read_text("utf-8").splitlines())


def _corpus() -> dict[str, list[str]]:
    """A few KB of the Jargon File: ~4 KB of training documents, two held-out ones of 200
    characters (a few blocks: validation runs twice per rehearsal)."""
    docs = [d for d in _documents() if len(d) >= 200]
    train = []
    while sum(map(len, train)) < 4000:
        train.append(docs.pop(0))
    return {"dataset": train, "validation_dataset": [d[:200] for d in docs[:2]]}


def _instructions(docs: list[str]) -> list[tuple[str, str]]:
    """(question, answer) pairs cut from the documents, short enough for SFT_MAX_SEQ_LEN."""
    return [(d[i:i + 60], d[i + 60:i + 130]) for d in docs for i in range(0, len(d) - 129, 130)]


def _bpe(vocab: int, specials: list[str], every_byte: bool):
    """A byte-level BPE of ``vocab`` ids trained on the corpus; its alphabet every byte (as a
    real one: any text encodes), or, when ``vocab`` is too small for that, the corpus's bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if every_byte else []
    tok.train_from_iterator(_documents(), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=specials, initial_alphabet=alphabet,
        show_progress=False))
    assert tok.get_vocab_size() <= vocab
    return tok


@cache
def _qwen_files(vocab: int) -> dict[str, bytes]:
    """vocab.json and merges.txt of a tiny byte-level BPE, and a tokenizer.json whose
    ``added_tokens`` are Qwen2.5's special tokens, numbered after the vocabulary."""
    import tempfile

    from torchtune.models.qwen2_5._tokenizer import QWEN2_5_SPECIAL_TOKENS

    specials = sorted(QWEN2_5_SPECIAL_TOKENS, key=QWEN2_5_SPECIAL_TOKENS.get)
    tok = _bpe(vocab - len(specials), [], every_byte=True)
    tok.add_special_tokens(specials)
    with tempfile.TemporaryDirectory() as tmp:
        tok.model.save(tmp)
        tok.save(str(Path(tmp) / "tokenizer.json"))
        return {name: (Path(tmp) / name).read_bytes()
                for name in ("vocab.json", "merges.txt", "tokenizer.json")}


@cache
def _hf_files(vocab: int) -> dict[str, bytes]:
    """tokenizer.json and tokenizer_config.json of a tiny byte-level BPE with one special token
    for BOS and EOS, as Phi-2's (CodeGen's)."""
    tok = _bpe(vocab, ["<|endoftext|>"], every_byte=vocab > 256)
    config = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
              "add_bos_token": False, "tokenizer_class": "CodeGenTokenizer"}
    return {"tokenizer.json": tok.to_str().encode(), "tokenizer_config.json":
            json.dumps(config).encode()}


@cache
def _spm_model(vocab: int) -> bytes:
    """A SentencePiece BPE model (Llama-2's kind: unk 0, bos 1, eos 2) trained on the corpus."""
    import io

    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_documents()), model_writer=out, vocab_size=vocab,
        model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2)
    return out.getvalue()


def write_tokenizer(node: DictConfig, vocab: int) -> None:
    """The files a tokenizer node names, of its kind, with ids below ``vocab``."""
    component = node._component_

    def write(path: str, data: bytes) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)

    # a few ids of the models' vocabulary left unused, as a padded embedding table leaves them
    if component in QWEN_TOKENIZERS:
        files = _qwen_files(vocab - 8)
        write(node.path, files["vocab.json"])
        write(node.merges_file, files["merges.txt"])
        write(node.special_tokens_path, files["tokenizer.json"])
    elif component in SPM_TOKENIZERS:
        write(node.path, _spm_model(vocab - 56))  # SentencePiece wants text for each piece
    elif component == HF_TOKENIZER:
        files = _hf_files(vocab)
        write(node.tokenizer_json_path, files["tokenizer.json"])
        write(node.tokenizer_config_json_path, files["tokenizer_config.json"])
    else:
        assert component in PACKAGED_TOKENIZERS, (
            f"the rehearsal cannot write the files of tokenizer {component!r}: teach "
            "write_tokenizer its kind")


def _checkpoint_files(checkpointer: DictConfig) -> list[str]:
    files = OmegaConf.to_container(checkpointer.checkpoint_files)
    if isinstance(files, dict):  # torchtune's {filename_format, max_filename}
        from torchtune.training.checkpointing._utils import FormattedCheckpointFiles

        return FormattedCheckpointFiles.from_dict(files).build_checkpoint_filenames()
    return list(files)


def write_checkpoint(model_node: DictConfig, checkpointer: DictConfig, seed: int) -> None:
    """A random tiny model of ``model_node`` as a Hugging Face folder where ``checkpointer``
    reads it: its family's config.json, the weights split over the files it names (with the
    index a sharded Hub folder has)."""
    import tempfile

    family, kwargs = resolve_teacher(model_node)
    base = tiny_models.hf_config(family.name)  # a Hub config of the family, at tiny_models' size
    model, _ = build_model(model_node, base)  # its fix-up's settings (a sliding window) are base's
    tiny_models.randomize_(model, seed, norm_center=0.0 if family.name == "gemma2" else 1.0)
    base.update(rope_theta=kwargs["rope_base"], max_position_embeddings=kwargs["max_seq_len"])
    for eps in ("rms_norm_eps", "layer_norm_eps"):
        if eps in base:
            base[eps] = kwargs["norm_eps"]
    folder = Path(str(checkpointer.checkpoint_dir))
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # the architecture fields of config.json are the model's own (save_hf_checkpoint)
        save_hf_checkpoint(model, tmp, base_config=base, model_type=str(checkpointer.model_type))
        (folder / "config.json").write_bytes((Path(tmp) / "config.json").read_bytes())
        state = load_file(str(Path(tmp) / "model.safetensors"))
    files = _checkpoint_files(checkpointer)
    index = {}
    for name, keys in zip(files, np.array_split(sorted(state), len(files))):
        part = {str(k): state[str(k)] for k in keys}
        if name.endswith(".safetensors"):
            save_file(part, str(folder / name), metadata={"format": "pt"})
        else:  # pytorch_model.bin
            torch.save(part, folder / name)
        index.update(dict.fromkeys(part, name))
    if len(files) > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))


def write_corpus(cfg: DictConfig) -> None:
    """The corpus files the datasets name: text for the token store (parquet, JSON lines, ...),
    instruction pairs for torchtune's instruct datasets."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = _corpus()
    files: dict[Path, list[dict[str, str]]] = {}
    for key in DATASET_KEYS:
        node = cfg.get(key)
        if node is None:
            continue
        if node._component_ == TEXT_BLOCKS:
            column = node.get("column", "text")
            for source in [node.source] if isinstance(node.source, str) else node.source:
                path = Path(source.replace("*", "00000"))  # a file, or one that a glob matches
                files[path] = files.get(path, []) + [{column: d} for d in corpus[key]]
        else:
            assert node.get("source") == "json", (
                f"{key}: the rehearsal writes JSON lines for instruct datasets, got "
                f"source={node.get('source')!r}")
            columns = node.get("column_map") or {"input": "input", "output": "output"}
            files[Path(node.data_files)] = [{columns["input"]: q, columns["output"]: a}
                                            for q, a in _instructions(corpus[key])]
    for path, rows in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".parquet":
            pq.write_table(pa.Table.from_pylist(rows), path)
        else:
            text = "".join(json.dumps(r) + "\n" for r in rows).encode()
            path.write_bytes(gzip.compress(text) if path.suffix == ".gz" else text)


def write_inputs(cfg: DictConfig) -> None:
    """Everything the rehearsal config names: tokenizer files, checkpoint folders, corpus."""
    vocab = min(vocab_size_of(cfg.teacher_model), vocab_size_of(cfg.student_model))
    for key in ("tokenizer", "teacher_tokenizer"):
        if cfg.get(key) is not None:
            write_tokenizer(cfg[key], vocab)
    for checkpointer, model, seed in CHECKPOINTERS:
        pruned = model == "student_model" and cfg.student_model._component_ == PRUNED_STUDENT
        if cfg.get(checkpointer) is not None and not pruned:
            if not str(cfg[checkpointer].checkpoint_dir).startswith("pkg://"):
                write_checkpoint(cfg[model], cfg[checkpointer], seed)
    write_corpus(cfg)


# ------------------------------------------------------------------------------- the runs


def _run(recipe: str, cfg: DictConfig) -> Any:
    """``tune run RECIPE`` on ``cfg``, in this process (the recipe resolves ``pkg://`` paths in
    place: it gets a copy)."""
    import importlib

    return importlib.import_module(recipe).run(OmegaConf.create(
        OmegaConf.to_container(cfg, resolve=False)))


def _with(cfg: DictConfig, **values: Any) -> DictConfig:
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    for key, value in values.items():
        OmegaConf.update(out, key, value)
    return out


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _stores(store_dir: str) -> set[str]:
    return {p.name for p in Path(store_dir).iterdir()}


@pytest.fixture
def quiet_process(tmp_path, monkeypatch):
    """The rehearsals run in this process as ``tune run`` would in its own: one intra-op thread
    (as the subprocess tests' OMP_NUM_THREADS=1; tiny matmuls only lose to thread hand-offs, by
    100x on a busy 2-core machine); the objects alive before the test, imports included, set
    aside from the garbage collector (torchtune's checkpointer collects twice per load, 0.4 s
    each over this test session's heap, none of it garbage); and ``datasets.load_dataset``'s
    cache (torchtune's instruct datasets) in the test's folder instead of ~/.cache."""
    import gc

    import datasets
    import transformers  # noqa: F401  (imported before the freeze, as the recipes' imports)

    import tad_torchtune.plots  # noqa: F401  (matplotlib, imported by tad_eval)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.collect()
    gc.freeze()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    yield
    gc.unfreeze()
    torch.set_num_threads(threads)


def _interrupted_copy(out: Path, step: int, dest: Path) -> Path:
    """The output folder of ``out``'s run as a kill right after its checkpoint of ``step`` leaves
    it: that checkpoint, ``latest`` naming it, the metrics logged until then."""
    import shutil

    name = f"step_{step:06d}"
    shutil.copytree(out / "checkpoints" / name, dest / "checkpoints" / name)
    (dest / "checkpoints" / "latest").write_text(name)
    rows = [line for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["step"] <= step]
    (dest / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))
    return dest


# the same in a resumed run: everything but the clock
TIMING = {"tokens_per_second", "tokens_per_second_per_device", "mfu", "peak_rss_gib",
          "train_seconds", "time"}
# the demo also trains from a teacher cache: tad_cache, then tad_distill teacher_cache_dir=DIR
CACHED = {"demo": "sampled"}


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINING_CONFIGS)
def test_dress_rehearsal(name, tmp_path, token_store_dir, quiet_process):
    shipped = load_shipped(name)
    cfg = rehearsal_config(shipped, tmp_path)
    changes = rehearsal_changes(shipped, cfg, tmp_path)
    assert {"output_dir", "max_steps"} <= set(changes)  # the check above compares something
    write_inputs(cfg)
    out = Path(cfg.output_dir)
    pruned = shipped.student_model._component_ == PRUNED_STUDENT

    # tad_prepare builds the token stores; tad_distill then memory-maps them, building none
    if not _is_sft(cfg):
        reports = _run("tad_prepare", cfg)
        assert [r["key"] for r in reports] == [k for k in DATASET_KEYS if cfg.get(k) is not None]
        assert all(r["num_tokens"] > 0 for r in reports)
        # each store built once (a validation split of the same files shares the store), or
        # linked from an earlier rehearsal's of the same contents (this session's store folder)
        assert {r["path"] for r in reports if r["built"] or r["linked"]} == \
            {r["path"] for r in reports}
    stores = _stores(token_store_dir)

    # 3 steps, a checkpoint (and its export) at step 2 and at the end, validation at the end
    _run("tad_distill", cfg)
    rows = _metrics(out)
    train = {r["step"]: r for r in rows if "loss" in r}
    assert sorted(train) == [1, 2, 3] and [r["step"] for r in rows if "val_kl" in r] == [3]
    weights = {"ce": cfg.get("clm_weight", 1.0), "kd_loss": cfg.get("kd_weight", 1.0),
               "hidden_loss": cfg.get("hidden_weight", 0.0)}
    for r in train.values():
        assert math.isfinite(r["loss"]) and r["step_tokens"] > 0
        assert r["loss"] == pytest.approx(sum(w * r.get(k, 0.0) for k, w in weights.items()),
                                          rel=1e-9)
    # steps 2 and 3 update the weights: step 3, resumed below, starts from step 2's update
    assert train[2]["lr"] > 0 and train[3]["lr"] > 0 and train[2]["grad_norm"] > 0
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == \
        ["step_000002", "step_000003"]
    assert (out / "checkpoints" / "step_000002" / "hf" / "model.safetensors").is_file() == \
        cfg.get("export_hf", True)
    assert _stores(token_store_dir) == stores

    # killed after step 2's checkpoint, resumed: step 3 again, as logged uninterrupted
    resumed = _with(cfg, output_dir=str(_interrupted_copy(out, 2, tmp_path / "resumed")),
                    resume_from_checkpoint=True)
    rehearsal_changes(shipped, resumed, tmp_path)
    _run("tad_distill", resumed)
    again = _metrics(Path(resumed.output_dir))
    assert [r["step"] for r in again] == [r["step"] for r in rows]
    for before, after in zip(rows, again):
        assert set(before) == set(after)
        for key in set(before) - TIMING:
            assert after[key] == pytest.approx(before[key], rel=1e-6, abs=1e-12), \
                (before["step"], key)
    student_dir = out / "student"
    ref, got = (load_file(str(d / "model.safetensors"))
                for d in (student_dir, Path(resumed.output_dir) / "student"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)

    # the export describes the student's architecture
    exported = json.loads((student_dir / "config.json").read_text())
    family = resolve_teacher(cfg.teacher_model if pruned else cfg.student_model)[0]
    with torch.device("meta"):
        student, _ = build_model(cfg.student_model)
    attn = student.layers[0].attn
    assert exported["model_type"] == family.hf_model_type
    assert (exported["num_hidden_layers"], exported["hidden_size"],
            exported["num_attention_heads"], exported["num_key_value_heads"],
            exported["intermediate_size"], exported["vocab_size"]) == (
        len(student.layers), attn.embed_dim, attn.num_heads, attn.num_kv_heads,
        student.layers[0].mlp.w1.out_features, vocab_size_of(cfg.student_model))
    if pruned:  # the shipped depth
        assert exported["num_hidden_layers"] == shipped.student_model.num_layers
    # the header's word on fused_float32_weight_grad: no effect where the output weight is frozen
    frozen = not output_weight(student).requires_grad
    header = (CONFIG_DIR / f"{name}.yaml").read_text()
    assert ("fused_float32_weight_grad has no effect here" in header) == \
        (frozen and bool(cfg.get("fused"))), (frozen, cfg.get("fused"))

    # tad_eval (demo_eval's config on the teacher and the export) reads the held-out text as
    # the training run's validation did: the KL and CE of its final val_kl / val_ce
    final = next(r for r in rows if "val_kl" in r)
    eval_cfg = load_shipped("demo_eval")
    eval_cfg.output_dir = str(tmp_path / "eval")
    eval_cfg.tokenizer = cfg.tokenizer
    eval_cfg.dataset = cfg.validation_dataset
    eval_cfg.teacher = {"checkpoint_dir": cfg.teacher_checkpointer.checkpoint_dir}
    eval_cfg.students = {"student": {"checkpoint_dir": str(student_dir)}}
    eval_cfg.vocab_alignment = cfg.get("vocab_alignment", "exact")
    eval_cfg.teacher_id_merges = cfg.get("teacher_id_merges")  # val_kl's teacher, merged alike
    eval_cfg.document_mask = bool(cfg.get("document_mask", False))
    report = _run("tad_eval", eval_cfg)["students"]["student"]
    assert report["kl"] == pytest.approx(final["val_kl"], rel=1e-5)
    assert report["ce"] == pytest.approx(final["val_ce"], rel=1e-5)
    assert report["top1_agreement"] == pytest.approx(final["val_top1_agreement"], abs=1e-9)
    assert final["val_kl"] > 1e-3  # the student is not its teacher: the KL compares something

    # transformers opens the export, with the logits of the project's loader
    from transformers import AutoModelForCausalLM

    ours = load_hf_folder(student_dir, where="student", device=torch.device("cpu"),
                          dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    tokens = torch.randint(0, exported["vocab_size"], (2, 16),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = project_logits(ours, forward_hidden(ours, tokens)[0])
        torch.testing.assert_close(theirs(tokens).logits, expected, atol=1e-4, rtol=1e-4)
    # and its tokenizer gives training's ids where training read a tokenizer.json (Phi-2's and
    # the demo's add no BOS, which torchtune's HuggingFaceBaseTokenizer prepends)
    from torchtune.config._utils import _get_component_from_path
    from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer
    from transformers import AutoTokenizer

    node = OmegaConf.to_container(cfg.tokenizer)
    trained_with = _get_component_from_path(node.pop("_component_"))(**node)
    if isinstance(trained_with, HuggingFaceBaseTokenizer):
        hf_tok = AutoTokenizer.from_pretrained(student_dir)
        for text in ("The quick brown fox.", " two  spaces", "<|endoftext|>x"):
            assert hf_tok(text)["input_ids"] == trained_with.encode(text, add_eos=False), text

    if name in CACHED:
        # tune run tad_cache --config NAME teacher_cache_dir=DIR cache_mode=sampled, then
        # tune run tad_distill --config NAME teacher_cache_dir=DIR
        cached = _with(cfg, output_dir=str(tmp_path / "cached"), cache_mode=CACHED[name],
                       teacher_cache_dir=str(tmp_path / "teacher_cache"))
        rehearsal_changes(shipped, cached, tmp_path, extra=CACHE)
        _run("tad_cache", cached)
        assert (tmp_path / "teacher_cache").is_dir()
        _run("tad_distill", cached)
        from_cache = {r["step"]: r for r in _metrics(tmp_path / "cached") if "loss" in r}
        assert sorted(from_cache) == [1, 2, 3]
        # step 1 at learning rate 0: steps 1 and 2 see the online run's student on its blocks;
        # the cross-entropy is exact, TAD's top-K terms and tail mass are the cache's float16
        for step in (1, 2):
            assert from_cache[step]["ce"] == pytest.approx(train[step]["ce"], rel=1e-6)
            for key in ("kd/tail_mass", "kd/abar", "kd/dkl1"):
                assert from_cache[step][key] == pytest.approx(train[step][key], rel=1e-3), key


def test_rehearsal_changes_refuse_anything_but_sizes_paths_and_steps(tmp_path):
    """The check that keeps the rehearsals on the shipped files fails on a change of anything
    else: a loss setting, a depth, a family, the files a checkpointer reads, a path moved
    elsewhere than under the test's folder, a pruned student's depth."""
    shipped = load_shipped("qwen2_5_3b_to_half")
    cfg = rehearsal_config(shipped, tmp_path)
    assert rehearsal_changes(shipped, cfg, tmp_path)["teacher_model.embed_dim"] == "model sizes"
    forbidden = {
        "kd_loss.k": 5,
        "teacher_model.num_layers": 4,
        "teacher_model": tiny_models.shrink_node(  # another family at a tiny size
            {"_component_": "torchtune.models.llama3_2.llama3_2_1b"}),
        "teacher_checkpointer.checkpoint_files": ["model.safetensors"],
        "tokenizer.path": "/elsewhere/vocab.json",
        "student_model.num_layers": 2,
        "fused": False,
        "cache_mode": "sampled",
    }
    for key, value in forbidden.items():
        with pytest.raises(AssertionError):
            rehearsal_changes(shipped, _with(cfg, **{key: value}), tmp_path)
    rehearsal_changes(shipped, _with(cfg, cache_mode="sampled"), tmp_path, extra=CACHE)


@pytest.mark.slow
def test_resume_with_more_steps_takes_the_new_schedule_from_its_first_step(
        tmp_path, token_store_dir, quiet_process):
    """2 steps, then ``resume_from_checkpoint=true max_steps=3``: the resumed run takes step 3 at
    the 3-step schedule's rate (half the peak with one warm-up step), not at the rate the 2-step
    cosine schedule ended with (0), which the optimizer state in the checkpoint carries."""
    from torchtune import config

    cfg = _with(rehearsal_config(load_shipped("demo"), tmp_path), max_steps=2)
    write_inputs(cfg)
    _run("tad_distill", cfg)
    _run("tad_distill", _with(cfg, resume_from_checkpoint=True, max_steps=3))
    logged = {r["step"]: r["lr"] for r in _metrics(Path(cfg.output_dir)) if "lr" in r}

    # the 3-step schedule's learning rates, from the config's own scheduler
    weight = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([weight], lr=cfg.optimizer.lr)
    scheduler = config.instantiate(cfg.lr_scheduler, optimizer, num_training_steps=3)
    expected = {}
    for step in (1, 2, 3):
        expected[step] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    assert expected[3] > 0
    assert logged == pytest.approx(expected, rel=1e-9)


@pytest.mark.slow
def test_rows_whose_answers_are_cut_away_are_told_not_trained_on_silently(
        tmp_path, token_store_dir, quiet_process, capsys):
    """The SFT config with rows cut to fewer tokens than their prompts (train_on_input: false):
    no label is left to learn or score. Each split says so once, and no val_* record of NaN
    means is logged; tad_eval on such rows refuses in one line."""
    cfg = _with(rehearsal_config(load_shipped("phi3_mini_to_tinyllama_sft"), tmp_path),
                max_steps=2, eval_every_n_steps=1, save_every_n_steps=None)
    write_inputs(cfg)
    cut = _with(cfg, **{"tokenizer.max_seq_len": 8})  # every prompt is longer
    _run("tad_distill", cut)
    warnings = [x for x in capsys.readouterr().err.splitlines() if "no position" in x]
    assert warnings == [
        "tad_distill: warning: step 1 trained on no position: every label of its dataset rows "
        "is ignored (a prompt that fills tokenizer.max_seq_len with train_on_input: false "
        "leaves no answer token to learn; told once)",
        "tad_distill: warning: the validation at step 1 scored no position: every label of its "
        "validation_dataset rows is ignored (a prompt that fills tokenizer.max_seq_len with "
        "train_on_input: false leaves no answer token to learn; told once)"]
    rows = _metrics(Path(cut.output_dir))
    assert [r["step"] for r in rows] == [1, 2] and all(r["step_tokens"] == 0 for r in rows)
    # steps with nothing to learn take no optimizer step: the student keeps the weights it
    # started from (AdamW's weight decay alone would have moved them)
    assert cut.optimizer.weight_decay > 0
    start = {}
    for name in _checkpoint_files(cut.student_checkpointer):
        start.update(load_file(str(Path(cut.student_checkpointer.checkpoint_dir) / name)))
    end = load_file(str(Path(cut.output_dir) / "student" / "model.safetensors"))
    assert start.keys() == end.keys() and all(torch.equal(start[k], end[k]) for k in start)
    assert not any("val_kl" in r for r in rows)
    eval_cfg = load_shipped("demo_eval")
    eval_cfg.output_dir = str(tmp_path / "eval")
    eval_cfg.tokenizer = cut.tokenizer
    eval_cfg.dataset = cut.validation_dataset
    eval_cfg.teacher = {"checkpoint_dir": cut.teacher_checkpointer.checkpoint_dir}
    eval_cfg.students = {"student": {"checkpoint_dir": str(Path(cut.output_dir) / "student")}}
    eval_cfg.vocab_alignment = cut.vocab_alignment
    with pytest.raises(ValueError, match=r"^dataset: no position to score in \d+ batch\(es\): "
                                         r"every label is ignored"):
        _run("tad_eval", eval_cfg)
    # the same rows at their length train and validate
    whole = _with(cfg, output_dir=str(tmp_path / "whole"))
    _run("tad_distill", whole)
    err = capsys.readouterr().err
    assert "no position" not in err and "the training rows" not in err
    assert any("val_kl" in r for r in _metrics(tmp_path / "whole"))


@pytest.mark.slow
def test_validating_on_the_training_rows_is_told(tmp_path, token_store_dir, quiet_process,
                                                 capsys):
    """An SFT config whose validation_dataset reads the training file's training split: one
    warning line (a token store's overlapping blocks are refused: check_held_out)."""
    cfg = rehearsal_config(load_shipped("phi3_mini_to_tinyllama_sft"), tmp_path)
    write_inputs(cfg)
    same = _with(cfg, max_steps=1, save_every_n_steps=None, eval_every_n_steps=None)
    same.validation_dataset = same.dataset
    _run("tad_distill", same)
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "the training rows" in x]
    assert line == (f"tad_distill: warning: validation_dataset: the same source, data_files and "
                    f"split as dataset ({cfg.dataset.data_files}, split train): val_kl is "
                    f"measured on the training rows")
