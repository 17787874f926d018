"""torchtune's EleutherAI harness recipe (``eleuther_eval``), for lm_eval 0.4.13, and offline.

    tune run tad_eleuther_eval --config eleuther_eval_student \
        student_dir=/tmp/tad_demo/tad_seed0/student

Runs torchtune 0.6.1's own ``EleutherEvalRecipe`` (its ``setup``: model, checkpointer, tokenizer,
quantizer as configured) with three corrections, each of which otherwise stops or skews it with
the installable harness (``pip install -e ".[eval]"``: lm_eval 0.4.13) and transformers 5:

1. torchtune compares version strings, ``version("lm-eval") < "0.4.5"``, so it refuses 0.4.10 and
   later (``"0.4.13" < "0.4.5"``); the releases it accepts, 0.4.5 to 0.4.9.2, import
   ``transformers.AutoModelForVision2Seq``, which transformers 5 removed. Compared as versions here.
2. Its model wrapper first builds lm_eval's ``HFLM`` from the Hugging Face Hub model ``gpt2``
   (a download, impossible offline) and then swaps in the torchtune model; ``StudentEvalWrapper``
   sets up what ``HFLM.__init__`` would for one causal model in one process, loading nothing.
3. That gpt2 tokenizer stayed behind and gave the prefix token of rolling log-likelihoods (the
   perplexity tasks): gpt2's BOS 50256, out of a 2048-token vocabulary (an index error) and a wrong
   token for any other model. Here it is the torchtune tokenizer's ``bos_id``.

Besides: ``--config NAME`` finds the configs shipped in ``tad_torchtune.configs``; ``pkg://PATH``
strings name files in ``tad_torchtune/assets`` (``include_path: pkg://lm_eval``, the shipped
tasks); the results are also written, unrounded, to ``output_dir/eleuther_results.json``.
"""

import importlib.util
import json
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch
import torchtune
from omegaconf import DictConfig, OmegaConf
from packaging.version import Version
from torchtune import config, training, utils

from tad_torchtune.schema import resolve_config_argv, resolve_package_paths
from tad_torchtune.common import provenance
from tad_torchtune.errors import ConfigError, reports_user_errors
from tad_torchtune.vocab import encode_text

MIN_LM_EVAL = "0.4.5"  # torchtune 0.6.1's own minimum


def _load_torchtune_recipe(name: str):
    """A recipe module of the torchtune wheel, by file (torchtune forbids ``import recipes``)."""
    path = Path(torchtune.__file__).parent.parent / "recipes" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"torchtune_recipe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


try:
    eleuther_eval = _load_torchtune_recipe("eleuther_eval")
except ImportError as err:  # lm_eval (or one of its Hugging Face dependencies) is missing
    if __name__ != "__main__":
        raise
    print(f"tad_eleuther_eval: cannot import {err.name!r}, which torchtune's eleuther_eval recipe "
          'needs; install the harness with pip install -e ".[eval]" (lm_eval[hf]==0.4.13)',
          file=sys.stderr)
    raise SystemExit(1)


class StudentEvalWrapper(eleuther_eval._LLMEvalWrapper):
    """torchtune's text-model wrapper for the harness, without the Hub's gpt2 behind it.

    Same arguments as torchtune's ``_LLMEvalWrapper``. The attributes are those ``HFLM.__init__``
    sets for one causal model in one process (a test checks that none is missing); the torchtune
    tokenizer gives the prefix token (its ``bos_id``).
    """

    def __init__(self, model, tokenizer, *, device, max_seq_length=4096, batch_size=8,
                 dtype=torch.float32, enable_kv_cache=True):
        from lm_eval.api.model import TemplateLM
        from transformers import AutoModelForCausalLM

        TemplateLM.__init__(self)  # rank 0 of 1, cache hook
        self.backend, self.AUTO_MODEL_CLASS = "causal", AutoModelForCausalLM
        self._device = torch.device(device)
        self._config = self.tokenizer = self.pretrained = self.peft = self.delta = None
        self.revision = "main"
        self.vocab_size = model.tok_embeddings.num_embeddings
        self.custom_prefix_token_id = tokenizer.bos_id
        self.add_bos_token = False  # tok_encode never adds one: torchtune's choice
        self.truncation, self.logits_cache = False, True
        self.think_end_token, self.enable_thinking, self.chat_template_args = None, None, {}
        self.softmax_dtype = self.mixed_precision_dtype = None
        self.batch_schedule, self.batch_sizes, self.max_batch_size = 1, {}, 64
        self.batch_size_per_gpu, self._max_length = batch_size, max_seq_length
        # torchtune's own fields, as its __init__ sets them
        self._model, self._tokenizer = model, tokenizer
        self._max_seq_length, self._batch_size = max_seq_length, batch_size
        self._dtype, self._enable_kv_cache = dtype, enable_kv_cache

    def tok_encode(self, text: str, **kwargs) -> list[int]:
        """torchtune's (no BOS: the harness puts the prefix token before a rolling window's
        first token), also without the BOS a tokenizer.json adds itself (``encode_text``)."""
        return encode_text(self._tokenizer, text)

    def _model_call(self, inps, *args, **kwargs):
        """torchtune's, after checking the ids against the student's vocabulary (an id past it
        is an index error deep in the embedding, a device-side assert on a GPU)."""
        top = int(inps.max()) if inps.numel() else -1
        if top >= self.vocab_size:
            raise ConfigError(f"tokenizer: the task's text holds token id {top}, but the "
                              f"student's vocabulary has {self.vocab_size} ids; accepted: the "
                              f"student's tokenizer")
        return super()._model_call(inps, *args, **kwargs)


class TADEleutherEvalRecipe(eleuther_eval.EleutherEvalRecipe):
    """torchtune's ``EleutherEvalRecipe`` with the corrections of the module docstring.

    Args:
        cfg: the parsed config (``configs/eleuther_eval_student.yaml``).
    """

    def __init__(self, cfg: DictConfig) -> None:
        # torchtune's __init__, its version check done on versions instead of strings
        installed = version("lm-eval")
        if Version(installed) < Version(MIN_LM_EVAL):
            raise RuntimeError(f"lm_eval {installed} is installed; this recipe needs >= "
                               f'{MIN_LM_EVAL}: pip install -e ".[eval]"')
        self.device = utils.get_device(device=cfg.device)
        self.dtype = training.get_dtype(dtype=cfg.dtype, device=self.device)
        self.logger = utils.get_logger(cfg.get("log_level", "info"))
        training.set_seed(seed=cfg.seed, debug_mode=cfg.get("cudnn_deterministic_mode", None))
        self.limit = cfg.limit
        self.tasks = list(cfg.tasks)
        self.batch_size = cfg.batch_size
        self.enable_kv_cache = cfg.get("enable_kv_cache", True)
        self.include_path = cfg.get("include_path", None)
        self.output_dir = Path(str(cfg.output_dir)).expanduser()
        # what eleuther_results.json records of how its figures were made
        plain = OmegaConf.to_container(cfg, resolve=True)
        self._record = {
            "student": {key: plain["checkpointer"].get(key)
                        for key in ("checkpoint_dir", "checkpoint_files", "model_type")},
            "settings": {key: plain.get(key) for key in (
                "tasks", "limit", "max_seq_length", "batch_size", "dtype", "device", "seed",
                "include_path", "enable_kv_cache")},
            "provenance": {**provenance(), "lm_eval": installed},
        }

    def setup(self, cfg: DictConfig) -> None:
        from lm_eval.tasks import TaskManager

        # the checkpoint and the tasks are checked before anything loads
        folder = cfg.checkpointer.get("checkpoint_dir")
        if folder is not None and not Path(str(folder)).expanduser().is_dir():
            raise ValueError(f"checkpointer.checkpoint_dir: {str(folder)!r} is not a folder; give "
                             "the student tad_distill exported (student_dir=OUTPUT_DIR/student)")
        self._fit_model_type(cfg.checkpointer)
        self._record["student"]["model_type"] = cfg.checkpointer.get("model_type")
        self._check_length(cfg)
        if self.enable_kv_cache and not kv_cache_keeps_the_window(cfg):
            self.enable_kv_cache = cfg.enable_kv_cache = False
            self._record["settings"]["enable_kv_cache"] = False
            print("tad_eleuther_eval: warning: enable_kv_cache: set to false: torchtune's "
                  "Gemma2 attention decodes with a KV cache past its sliding window over the "
                  "first window of tokens, not the last; generation runs without the cache",
                  file=sys.stderr, flush=True)
        if self.include_path is not None and not Path(str(self.include_path)).is_dir():
            raise ValueError(f"include_path: {str(self.include_path)!r} is not a folder of "
                             "lm_eval task YAML files (pkg://lm_eval: the shipped tasks)")
        # lm_eval's own ~14k task files take seconds to index: only when a task is not local
        self.task_manager = None
        if self.include_path is not None:
            self.task_manager = TaskManager(include_path=self.include_path, include_defaults=False)
        if self.task_manager is None or not set(self.tasks) <= set(self.task_manager.all_tasks):
            self.task_manager = TaskManager(include_path=self.include_path)
        for task in self.tasks:
            if task not in self.task_manager.all_tasks and not Path(str(task)).is_file():
                raise ValueError(
                    f"tasks: {task!r} is neither a task, group or tag of lm_eval nor of "
                    f"include_path {self.include_path!r}, nor a task YAML file; e.g. "
                    "jargon_heldout (shipped) or hellaswag; `lm_eval ls tasks` lists them")
        # torchtune's setup picks the text-model wrapper by this module-level name
        eleuther_eval._LLMEvalWrapper = StudentEvalWrapper
        super().setup(cfg)

    @staticmethod
    def _fit_model_type(checkpointer: DictConfig) -> None:
        """The checkpointer's ``model_type`` against the folder's config.json, which the model
        (``hf_decoder``) is built from: a null one becomes the family's, a set one must convert
        that model type's weights (another family's conversion fails on a key, or loads Llama's
        q/k weights unpermuted, silently)."""
        from tad_torchtune.checkpointing import META
        from tad_torchtune.models import model_from_hf_config
        from tad_torchtune.models.loading import (
            check_checkpointer_model_type,
            hf_config_of,
            no_config_json,
        )

        hf = hf_config_of(checkpointer)
        if hf is None:  # another checkpointer's folder, left to it; a training checkpoint's not
            folder = Path(str(checkpointer.checkpoint_dir)).expanduser()
            if (folder / META).is_file():
                raise ConfigError(no_config_json(folder, "checkpointer.checkpoint_dir"))
            return
        if checkpointer.get("model_type") is None:
            where = str(Path(str(checkpointer.checkpoint_dir)).expanduser() / "config.json")
            with torch.device("meta"):
                _, family = model_from_hf_config(hf, where=where)
            checkpointer.model_type = family.checkpointer_model_type
        else:
            check_checkpointer_model_type(checkpointer, hf, checkpointer_key="checkpointer")

    @staticmethod
    def _check_length(cfg: DictConfig) -> None:
        """``max_seq_length`` (lm_eval's rolling windows) within the student's ``max_seq_len``,
        before the model loads (else its first request fails with torchtune's message)."""
        from tad_torchtune.models.loading import hf_config_of

        length = cfg.get("max_seq_length")
        model = cfg.get("model") or {}
        limit = model.get("max_seq_len")
        if limit is None and str(model.get("_component_", "")).endswith(".hf_decoder"):
            limit = (hf_config_of(model) or {}).get("max_position_embeddings")
        if length is not None and limit is not None and int(length) > int(limit):
            raise ConfigError(f"max_seq_length: {length} exceeds the student's max_seq_len "
                              f"{limit}; accepted: at most {limit}")

    def evaluate(self) -> dict:
        """torchtune's ``evaluate``, also writing the results to ``output_dir``."""
        from lm_eval.evaluator import evaluate
        from lm_eval.tasks import get_task_dict
        from lm_eval.utils import make_table

        task_dict = get_task_dict(self.tasks, self.task_manager)
        start = time.time()
        self.logger.info(f"Running evaluation on the following tasks: {self.tasks}")
        output = evaluate(self.eleuther_model_wrapper, task_dict, limit=self.limit)
        self.logger.info(f"Eval completed in {time.time() - start:.02f} seconds.")
        self.logger.info(f"\n\n{make_table(output)}\n")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / "eleuther_results.json"
        report = {"results": output["results"], "n-samples": output.get("n-samples"),
                  **{key: output[key] for key in ("versions", "n-shot", "configs") if key in output},
                  **self._record}
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        self.logger.info(f"tad_eleuther_eval: results in {path}")
        return output


def kv_cache_keeps_the_window(cfg: DictConfig) -> bool:
    """Whether decoding with a KV cache attends as a full forward does: not for a Gemma2
    student whose ``sliding_window`` is shorter than ``max_seq_length`` (torchtune's
    ``Gemma2Attention`` builds the window from the mask's row index, 0 for a one-row decoding
    mask: every position past the window attends to the first window of tokens)."""
    from tad_torchtune.models.loading import hf_config_of

    hf = hf_config_of(cfg.checkpointer) or {}
    window, length = hf.get("sliding_window"), cfg.get("max_seq_length")
    return not (hf.get("model_type") == "gemma2" and window and length and length > window)


@reports_user_errors("tad_eleuther_eval")
@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point of ``tune run tad_eleuther_eval --config ...``."""
    resolve_package_paths(cfg)
    config.log_config(recipe_name="TADEleutherEvalRecipe", cfg=cfg)
    recipe = TADEleutherEvalRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.evaluate()


if __name__ == "__main__":
    sys.argv = resolve_config_argv(sys.argv)
    sys.exit(recipe_main())
