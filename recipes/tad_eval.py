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
- ``document_mask``: attention stops at document boundaries, as ``tad_distill``'s; set it as the
  run did, or the KL and CE are not its ``val_kl`` / ``val_ce``.
- Strings starting with ``pkg://`` anywhere in the config name files shipped in
  ``tad_torchtune/assets`` (``pkg://demo/teacher``).
"""

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config
from tqdm import tqdm

from tad_torchtune.checks import is_int
from tad_torchtune.common import DTYPES, provenance
from tad_torchtune.data import collate
from tad_torchtune.data.checks import build_dataset, check_batch, check_row_length
from tad_torchtune.errors import ConfigError, instantiate, reports_user_errors
from tad_torchtune.metrics import StudentMetrics, TeacherMetrics
from tad_torchtune.models import (
    forward_hidden,
    logit_softcap,
    output_weight,
    project_logits,
    supports_flex_attention,
)
from tad_torchtune.models.loading import check_hf_folder, load_hf_folder, softcap_of
from tad_torchtune.parallel import require_one_process
from tad_torchtune.schema import EVAL, resolve_config_argv, resolve_package_paths
from tad_torchtune.vocab import (
    align_teacher_vocab,
    check_merges_softcap,
    check_teacher_id_merges,
    check_teacher_tokenizer,
    check_vocab_compat,
)

#: the keys ``eval.json`` records under ``settings``: those that change its figures
_SETTINGS = ("dtype", "device", "document_mask", "vocab_alignment", "teacher_id_merges",
             "batch_size", "max_batches", "chunk_size", "num_bins", "tail_ks", "seed")


def _tail_ks(value: Any) -> tuple[int, ...]:
    """``tail_ks``, sorted: integers >= 1 (not 2.5 read as 2, nor true as 1), one line naming
    the key otherwise."""
    bad = next((k for k in value if not is_int(k) or k < 1), None)
    if not value or bad is not None:
        raise ConfigError(f"tail_ks: {list(value)!r}{f' holds {bad!r}' if value else ' is empty'}; "
                          f"accepted: a list of integers from 1 to the vocabulary size - 1")
    return tuple(sorted(set(value)))


class TADEvalRecipe:
    """Evaluate students against a teacher on a held-out text set (see the module docstring).

    Args:
        cfg: the parsed config.
    """

    def __init__(self, cfg: DictConfig) -> None:
        EVAL.validate(cfg)
        get = lambda key: EVAL.get(cfg, key)  # noqa: E731
        self._device = torch.device(get("device"))
        self._dtype = DTYPES[get("dtype")]
        self._output_dir = Path(str(cfg.output_dir)).expanduser()
        self._batch_size = get("batch_size")
        self._max_batches = get("max_batches")
        self._chunk_size = get("chunk_size")
        self._num_bins = get("num_bins")
        self._tail_ks = _tail_ks(get("tail_ks"))
        self._vocab_alignment = get("vocab_alignment")
        self._document_mask = bool(get("document_mask"))
        self._checked = False  # the merges and tokenizers (before loading, where config.json can)
        if len(cfg.students) == 0:
            raise ConfigError(
                "students: must map at least one name to {checkpoint_dir: ...}, e.g. "
                "students.tad.checkpoint_dir=/path/to/student"
            )

    def setup(self, cfg: DictConfig) -> None:
        # Tokenizer before the dataset (which tokenizes with it); models last, the heaviest part.
        if self._output_dir.exists() and not self._output_dir.is_dir():  # now, not after it all
            raise ConfigError(f"output_dir: {str(self._output_dir)!r} is a file; it must be a "
                              f"folder or not exist")
        torch.manual_seed(int(EVAL.get(cfg, "seed")))
        tokenizer = instantiate(cfg.tokenizer, "tokenizer")
        teacher_tokenizer = (instantiate(cfg.teacher_tokenizer, "teacher_tokenizer")
                             if cfg.get("teacher_tokenizer") is not None else None)
        dataset = build_dataset(cfg.dataset, "dataset", tokenizer)
        if len(dataset) == 0:
            raise ValueError("dataset: the held-out set is empty")
        self._dataset = dataset
        self._data_desc = {k: v for k, v in OmegaConf.to_container(cfg.dataset).items()}
        # every folder checked before any model loads: a wrong last student costs no loading;
        # rows longer than a model built from its config.json takes, too
        folders = {"teacher": cfg.teacher} | {f"students.{n}": s for n, s in cfg.students.items()}
        vocabs, configs = {}, {}
        for where, spec in folders.items():
            _, hf, _ = check_hf_folder(spec, where=where)
            configs[where] = hf
            # a folder's model node may build another vocabulary: known once loaded
            vocabs[where] = hf.get("vocab_size") if spec.get("model") is None else None
            if spec.get("model") is None and hf.get("max_position_embeddings"):
                check_row_length(dataset, "dataset", tokenizer, hf["max_position_embeddings"])
        if None not in vocabs.values():  # sizes, merges' ids, tokenizers, before any load
            teacher_vocab = vocabs.pop("teacher")
            self._check_vocabularies(cfg, teacher_vocab, vocabs, teacher_tokenizer, tokenizer)
            if self._merges is not None:  # Gemma2's caps come from its config.json
                check_merges_softcap(self._merges, softcap_of(None, configs["teacher"]))
        self._teacher = load_hf_folder(cfg.teacher, where="teacher", device=self._device,
                                       dtype=self._dtype)
        self._students = {
            str(name): load_hf_folder(spec, where=f"students.{name}", device=self._device,
                                      dtype=self._dtype)
            for name, spec in cfg.students.items()
        }
        self._check_vocabularies(
            cfg, output_weight(self._teacher).shape[0],
            {f"students.{name}": output_weight(m).shape[0] for name, m in self._students.items()},
            teacher_tokenizer, tokenizer)
        models = [self._teacher, *self._students.values()]
        self._max_seq_len = min(m.max_seq_len for m in models)
        # the students' vocabulary: that of the teacher's distribution (truncate_teacher cuts
        # its logits to it before any softmax, for its own metrics too)
        self._vocab_size = min(output_weight(m).shape[0] for m in models)
        check_merges_softcap(self._merges, logit_softcap(self._teacher))
        if self._tail_ks[-1] >= self._vocab_size:
            raise ConfigError(f"tail_ks: {self._tail_ks[-1]} is not below the vocabulary of "
                              f"{self._vocab_size} ids; accepted: integers from 1 to "
                              f"{self._vocab_size - 1}")
        self._flex_attention = supports_flex_attention(
            self._device, self._teacher, *self._students.values())
        self._settings = {key: EVAL.get(cfg, key) for key in _SETTINGS} | {
            "tail_ks": list(self._tail_ks)}
        self._paths = {"teacher": str(cfg.teacher.checkpoint_dir)} | {
            f"students.{name}": str(spec.checkpoint_dir) for name, spec in cfg.students.items()
        }

    def _check_vocabularies(self, cfg: DictConfig, teacher_vocab: int,
                            students: dict[str, int], teacher_tokenizer: Any,
                            tokenizer: Any) -> None:
        """Each student's vocabulary against the teacher's (``students``: its key -> size),
        then, the first time (``_checked``), ``teacher_id_merges`` and ``teacher_tokenizer``
        (``vocab.check_teacher_tokenizer``, its warnings printed)."""
        for where, vocab in students.items():
            try:
                check_vocab_compat(teacher_vocab, vocab, self._vocab_alignment)
            except ValueError as err:
                raise ConfigError(f"{where}: {err}") from None
        if self._checked:
            return
        self._checked = True
        self._check_merges(cfg, teacher_vocab, students)
        for line in check_teacher_tokenizer(teacher_tokenizer, tokenizer, teacher_vocab,
                                            min(students.values()), self._vocab_alignment,
                                            self._merges):
            print(f"tad_eval: warning: {line}", file=sys.stderr)

    def _check_merges(self, cfg: DictConfig, teacher_vocab: int, students: dict[str, int]
                      ) -> None:
        """``teacher_id_merges`` against the teacher's vocabulary and the students' (one
        vocabulary, the one the merges are into), as ``self._merges``."""
        self._merges = check_teacher_id_merges(
            EVAL.get(cfg, "teacher_id_merges"), teacher_vocab_size=teacher_vocab,
            student_vocab_size=min(students.values()), vocab_alignment=self._vocab_alignment)
        other = {n: v for n, v in students.items() if v != min(students.values())}
        if self._merges is not None and other:
            name, size = next(iter(other.items()))
            raise ConfigError(f"teacher_id_merges: {name} has {size} ids, the others "
                              f"{min(students.values())}; accepted: students of one "
                              f"vocabulary, the one the merges are into")

    def _batches(self):
        n = len(self._dataset)
        for start in range(0, n, self._batch_size):
            batch = collate([self._dataset[i] for i in range(start, min(n, start + self._batch_size))])
            check_batch(batch, max_seq_len=self._max_seq_len, vocab_size=self._vocab_size,
                        vocab_of="the smallest model")
            # the attention of tad_distill's validation
            yield batch.to(self._device).with_attention(self._document_mask,
                                                        flex=self._flex_attention)

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
        for i, batch in enumerate(tqdm(self._batches(), total=n_batches, desc="tad_eval")):
            if i >= n_batches:
                break
            # logits in the model dtype; the metrics upcast chunk by chunk
            tokens, labels = batch.tokens, batch.labels
            attention = {"mask": batch.mask, "input_pos": batch.input_pos}
            teacher_logits = project_logits(
                self._teacher, forward_hidden(self._teacher, tokens, **attention)[0])
            if self._merges is not None:  # into the students' ids (a view: all of them read it)
                teacher_logits = self._merges.align_(teacher_logits, self._vocab_size,
                                                     self._vocab_alignment)
            teacher_metrics.update(
                align_teacher_vocab(teacher_logits, self._vocab_size, self._vocab_alignment),
                labels)
            for name, student in self._students.items():
                logits = project_logits(student, forward_hidden(student, tokens, **attention)[0])
                student_metrics[name].update(logits, teacher_logits, labels)
        teacher = teacher_metrics.compute()
        if not teacher["num_tokens"]:
            raise ConfigError(
                f"dataset: no position to score in {n_batches} batch(es): every label is "
                f"ignored (a prompt that fills tokenizer.max_seq_len with train_on_input: false "
                f"leaves no answer token)")
        return {
            "teacher": teacher,
            "students": {name: m.compute() for name, m in student_metrics.items()},
            "checkpoints": self._paths,
            "dataset": self._data_desc,
            "dataset_fingerprint": getattr(self._dataset, "fingerprint", None),
            "num_batches": n_batches,
            "seconds": round(time.time() - start, 2),
            "settings": self._settings,
            "provenance": provenance(),
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
    """The report's table, a column per metric, each value after at least one space (a
    perplexity of a million does not run into the CE before it)."""

    def row(name: str, *cells: str) -> str:
        return f"{name:<16}" + "".join(f" {c:>{w}}" for c, w in zip(cells, (8, 8, 9, 9, 9)))

    rows = [row("model", "KL", "CE", "ppl", "Full-ECE", "top1 agr")]
    t = report["teacher"]
    rows.append(row("teacher", "", f"{t['ce']:.4f}", f"{t['ppl']:.2f}", f"{t['full_ece']:.4f}",
                    ""))
    for name, s in report["students"].items():
        rows.append(row(name, f"{s['kl']:.4f}", f"{s['ce']:.4f}", f"{s['ppl']:.2f}",
                        f"{s['full_ece']:.4f}", f"{s['top1_agreement']:.4f}"))
    tails = ", ".join(f"K={k}: {v:.3f}" for k, v in t["tail_mass"].items())
    rows.append(f"teacher tail mass {tails}; top-1 != next token: {t['mismatch_rate']:.1%}")
    return "\n".join(rows)


def run(cfg: DictConfig) -> dict[str, Any]:
    """``tune run tad_eval`` on a parsed config, in this process; returns the report."""
    require_one_process("tad_eval")
    resolve_package_paths(cfg)
    recipe = TADEvalRecipe(cfg)
    recipe.setup(cfg)
    report = recipe.evaluate()
    paths = recipe.save(report)
    print(summary_table(report))
    print("tad_eval: outputs in " + ", ".join(f"{k}: {v}" for k, v in paths.items()))
    return report


@reports_user_errors("tad_eval")
@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point of ``tune run tad_eval --config ...``."""
    run(cfg)


if __name__ == "__main__":
    sys.argv = resolve_config_argv(sys.argv)
    sys.exit(recipe_main())
