"""Held-out evaluation of distilled students against their teacher.

    tune run tad_eval --config demo_eval students.tad.checkpoint_dir=/tmp/tad_demo/tad_seed0/student

For each student: KL(teacher || student), cross-entropy, perplexity, Full-ECE and top-1 agreement
with the teacher (``tad_torchtune.metrics.StudentMetrics``). For the teacher: mean tail mass
``alpha_K`` for each K and the rate at which its most probable token is not the next token
(``TeacherMetrics``), the two panels of the TAD paper's Figure 2. Writes ``eval.json``,
``figure2_teacher.png`` and ``reliability.png`` into ``output_dir``.

Config (see ``configs/demo_eval.yaml``):

- ``teacher`` and each entry of ``students`` (a mapping name -> spec) is a Hugging Face checkpoint
  folder: ``checkpoint_dir`` (``config.json`` + ``*.safetensors``), and optionally
  ``checkpoint_files`` (default: every ``*.safetensors`` there), ``model`` (a torchtune model
  builder ``_component_``; default: built from ``config.json`` by its registered model family,
  ``tad_torchtune.models.model_from_hf_config``) and ``model_type`` (the ``FullModelHFCheckpointer`` model type; default from ``config.json``).
- ``tokenizer`` and ``dataset``: components; the dataset is built as
  ``instantiate(dataset, tokenizer)`` and yields ``{"tokens", "labels"}`` blocks of equal length.
  Position t predicts token t+1 (labels are shifted left, the last position ignored), as in
  ``tad_distill``'s validation, so its numbers match ``val_kl`` / ``val_ce`` in ``metrics.jsonl``.
- Strings starting with ``pkg://`` anywhere in the config name files shipped in
  ``tad_torchtune/assets`` (``pkg://demo/teacher``).
"""

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torchtune import config, training
from tqdm import tqdm

from tad_torchtune.common import DTYPES, shift_labels
from tad_torchtune.config_checks import resolve_config_argv, resolve_package_paths
from tad_torchtune.data import resolve_asset
from tad_torchtune.errors import check_checkpoint_files, instantiate, reports_user_errors
from tad_torchtune.metrics import TAIL_KS, StudentMetrics, TeacherMetrics
from tad_torchtune.models import build_model, forward_hidden, model_from_hf_config, project_logits

def hf_decoder(checkpoint_dir: str) -> nn.Module:
    """The torchtune decoder (random weights) that the ``config.json`` in ``checkpoint_dir``
    describes, for any registered model family: a model ``_component_`` for configs of other
    recipes (e.g. ``eleuther_eval``) that load the weights with ``FullModelHFCheckpointer``
    themselves."""
    path = Path(resolve_asset(str(checkpoint_dir))).expanduser() / "config.json"
    if not path.is_file():
        raise ValueError(f"model.checkpoint_dir: {str(path.parent)!r} has no config.json")
    return model_from_hf_config(json.loads(path.read_text()), where="model.checkpoint_dir")[0]


def load_hf_model(spec: DictConfig, *, where: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Build the model of ``spec`` and load its Hugging Face checkpoint through torchtune."""
    if spec is None or spec.get("checkpoint_dir") is None:
        raise ValueError(f"{where}.checkpoint_dir: required (a Hugging Face checkpoint folder)")
    ckpt_dir = Path(str(spec.checkpoint_dir)).expanduser()
    if not (ckpt_dir / "config.json").is_file():
        raise ValueError(f"{where}.checkpoint_dir: {str(ckpt_dir)!r} has no config.json")
    hf = json.loads((ckpt_dir / "config.json").read_text())
    files = spec.get("checkpoint_files")
    if files is None:
        files = sorted(p.name for p in ckpt_dir.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{where}.checkpoint_dir: no *.safetensors file in {str(ckpt_dir)!r}")
    if spec.get("model") is not None:
        model, _ = build_model(spec.model, hf)
        model_type = spec.get("model_type")
        if model_type is None:
            raise ValueError(f"{where}.model_type: required when {where}.model is given (e.g. LLAMA3)")
    else:
        model, family = model_from_hf_config(hf, where=f"{where}.checkpoint_dir")
        model_type = spec.get("model_type", family.checkpointer_model_type)
    check_checkpoint_files({"checkpoint_dir": str(ckpt_dir), "checkpoint_files": list(files)},
                           where)
    # The checkpointer insists on an output folder; nothing is written there while loading.
    with tempfile.TemporaryDirectory() as tmp:
        checkpointer = training.FullModelHFCheckpointer(
            checkpoint_dir=str(ckpt_dir), checkpoint_files=list(files),
            model_type=str(model_type), output_dir=tmp,
        )
        state = checkpointer.load_checkpoint()[training.MODEL_KEY]
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval()


class TADEvalRecipe:
    """Evaluate students against a teacher on a held-out text set (see the module docstring).

    Args:
        cfg: the parsed config.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self._device = torch.device(cfg.get("device", "cpu"))
        dtype = cfg.get("dtype", "fp32")
        if dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {sorted(DTYPES)}, got {dtype!r}")
        self._dtype = DTYPES[dtype]
        self._output_dir = Path(str(cfg.output_dir)).expanduser()
        self._batch_size = int(cfg.get("batch_size", 8))
        self._max_batches = cfg.get("max_batches")
        self._chunk_size = cfg.get("chunk_size", 1024)
        self._num_bins = int(cfg.get("num_bins", 10))
        self._tail_ks = tuple(int(k) for k in cfg.get("tail_ks", TAIL_KS))
        self._vocab_alignment = cfg.get("vocab_alignment", "exact")
        students = cfg.get("students")
        if not isinstance(students, DictConfig) or len(students) == 0:
            raise ValueError(
                "students: must map at least one name to {checkpoint_dir: ...}, e.g. "
                "students.tad.checkpoint_dir=/path/to/student"
            )
        if self._batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self._batch_size}")

    def setup(self, cfg: DictConfig) -> None:
        # Tokenizer before the dataset (which tokenizes with it); models last, the heaviest part.
        torch.manual_seed(int(cfg.get("seed", 0)))
        tokenizer = instantiate(cfg.tokenizer, "tokenizer")
        dataset = instantiate(cfg.dataset, "dataset", tokenizer)
        if len(dataset) == 0:
            raise ValueError("dataset: the held-out set is empty")
        self._dataset = dataset
        self._data_desc = {k: v for k, v in OmegaConf.to_container(cfg.dataset).items()}
        self._teacher = load_hf_model(cfg.teacher, where="teacher", device=self._device, dtype=self._dtype)
        self._students = {
            str(name): load_hf_model(spec, where=f"students.{name}", device=self._device, dtype=self._dtype)
            for name, spec in cfg.students.items()
        }
        self._paths = {"teacher": str(cfg.teacher.checkpoint_dir)} | {
            f"students.{name}": str(spec.checkpoint_dir) for name, spec in cfg.students.items()
        }

    def _batches(self):
        n = len(self._dataset)
        for start in range(0, n, self._batch_size):
            items = [self._dataset[i] for i in range(start, min(n, start + self._batch_size))]
            # samples hold lists (torchtune datasets) or tensors (text_block_dataset)
            tokens = torch.stack([torch.as_tensor(it["tokens"]) for it in items]).long()  # (B, T)
            labels = shift_labels(torch.stack([torch.as_tensor(it["labels"]) for it in items]).long())
            yield tokens.to(self._device), labels.to(self._device)

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        teacher_metrics = TeacherMetrics(
            ks=self._tail_ks, num_bins=self._num_bins, chunk_size=self._chunk_size
        )
        student_metrics = {
            name: StudentMetrics(num_bins=self._num_bins, chunk_size=self._chunk_size,
                                 vocab_alignment=self._vocab_alignment)
            for name in self._students
        }
        n_batches = -(-len(self._dataset) // self._batch_size)
        if self._max_batches is not None:
            n_batches = min(n_batches, int(self._max_batches))
        start = time.time()
        for i, (tokens, labels) in enumerate(tqdm(self._batches(), total=n_batches, desc="tad_eval")):
            if i >= n_batches:
                break
            # logits in the model dtype; the metrics upcast chunk by chunk
            teacher_logits = project_logits(self._teacher, forward_hidden(self._teacher, tokens)[0])
            teacher_metrics.update(teacher_logits, labels)
            for name, student in self._students.items():
                logits = project_logits(student, forward_hidden(student, tokens)[0])
                student_metrics[name].update(logits, teacher_logits, labels)
        return {
            "teacher": teacher_metrics.compute(),
            "students": {name: m.compute() for name, m in student_metrics.items()},
            "checkpoints": self._paths,
            "dataset": self._data_desc,
            "num_batches": n_batches,
            "seconds": round(time.time() - start, 2),
        }

    def save(self, report: dict[str, Any]) -> dict[str, Path]:
        from tad_torchtune.plots import plot_reliability, plot_teacher_stats

        self._output_dir.mkdir(parents=True, exist_ok=True)
        paths = {
            "report": self._output_dir / "eval.json",
            "figure2": self._output_dir / "figure2_teacher.png",
            "reliability": self._output_dir / "reliability.png",
        }
        paths["report"].write_text(json.dumps(report, indent=2) + "\n")
        plot_teacher_stats({"teacher": report["teacher"]}, paths["figure2"])
        plot_reliability(
            {"teacher": report["teacher"]["reliability"]}
            | {name: s["reliability"] for name, s in report["students"].items()},
            paths["reliability"],
        )
        return paths


def summary_table(report: dict[str, Any]) -> str:
    rows = [f"{'model':<16}{'KL':>9}{'CE':>9}{'ppl':>10}{'Full-ECE':>10}{'top1 agr':>10}"]
    t = report["teacher"]
    rows.append(f"{'teacher':<16}{'':>9}{t['ce']:>9.4f}{t['ppl']:>10.2f}{t['full_ece']:>10.4f}{'':>10}")
    for name, s in report["students"].items():
        rows.append(f"{name:<16}{s['kl']:>9.4f}{s['ce']:>9.4f}{s['ppl']:>10.2f}"
                    f"{s['full_ece']:>10.4f}{s['top1_agreement']:>10.4f}")
    tails = ", ".join(f"K={k}: {v:.3f}" for k, v in t["tail_mass"].items())
    rows.append(f"teacher tail mass {tails}; top-1 != next token: {t['mismatch_rate']:.1%}")
    return "\n".join(rows)


@reports_user_errors("tad_eval")
@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point of ``tune run tad_eval --config ...``."""
    resolve_package_paths(cfg)
    recipe = TADEvalRecipe(cfg)
    recipe.setup(cfg)
    report = recipe.evaluate()
    paths = recipe.save(report)
    print(summary_table(report))
    print("tad_eval: outputs in " + ", ".join(f"{k}: {v}" for k, v in paths.items()))


if __name__ == "__main__":
    sys.argv = resolve_config_argv(sys.argv)
    sys.exit(recipe_main())
