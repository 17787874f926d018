"""Tokenize the corpus of a config once, on every core, into memory-mapped token stores.

    tune run tad_prepare --config demo
    tune run tad_prepare --config path/to/config.yaml num_workers=16 dataset.store_dir=/data/stores

Reads the same config as ``tad_distill`` (or ``tad_eval``): its ``tokenizer``, and the
``source``, ``column``, ``store_dir`` and ``token_dtype`` of ``dataset`` and
``validation_dataset`` when they are ``tad_torchtune.data.text_block_dataset``. Builds the store
of each (the two share one when they name the same files), links the store of the same
contents (files touched or copied since), or reports it already built, so that
training then starts by memory-mapping it. Blocks and splits are not stored: they are cut when
the dataset opens the store, so ``max_seq_len``, ``split`` and ``validation_fraction`` can
change without a new prepare.

``num_workers`` (default: every core) is the number of worker processes for tokenizers that are
not a torchtune ``HuggingFaceBaseTokenizer``; that one is batch-encoded on the Hugging Face
library's own threads (``RAYON_NUM_THREADS`` limits them). Interrupted or killed, it leaves no
store, and the same command goes on from its last checkpoint (at most 30 s of work lost, within
a file too).
"""

import os
import sys
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torchtune import config
from torchtune.config._utils import _get_component_from_path

from tad_torchtune.schema import PREPARE, resolve_config_argv, resolve_package_paths
from tad_torchtune.data import TextBlockDataset, prepare_store, text_block_dataset
from tad_torchtune.errors import instantiate, reports_user_errors

DATASET_KEYS = ("dataset", "validation_dataset")


class TADPrepareRecipe:
    """Builds the token stores of a config's datasets; see the module docstring.

    Args:
        cfg: the parsed config, ``pkg://`` paths resolved.
    """

    def __init__(self, cfg: DictConfig) -> None:
        PREPARE.validate(cfg)
        self._num_workers = PREPARE.get(cfg, "num_workers")

    def setup(self, cfg: DictConfig) -> None:
        """The datasets first (a config without one fails before the tokenizer loads), then the
        tokenizer."""
        self._datasets: list[tuple[str, DictConfig]] = []
        for key in DATASET_KEYS:
            node = cfg.get(key)
            if node is None:
                continue
            component = node.get("_component_") if isinstance(node, DictConfig) else None
            try:
                ours = _get_component_from_path(component) in (text_block_dataset, TextBlockDataset)
            except Exception:
                ours = False
            if ours:
                self._datasets.append((key, node))
            elif key == "dataset":
                raise ValueError(
                    f"dataset._component_: tad_prepare builds the token stores of "
                    f"tad_torchtune.data.text_block_dataset, got {component!r}"
                )
            else:
                print(f"tad_prepare: {key}: skipped ({component!r} reads no token store)")
        if not self._datasets:
            raise ValueError("dataset: missing; tad_prepare needs a `dataset` of "
                             "tad_torchtune.data.text_block_dataset")
        self._tokenizer = instantiate(cfg.tokenizer, "tokenizer")

    def prepare(self) -> list[dict[str, Any]]:
        """Build or open each dataset's store; returns and prints what each one holds."""
        done: dict[str, str] = {}
        reports = []
        for key, node in self._datasets:
            source = node.get("source")
            source = OmegaConf.to_container(source) if OmegaConf.is_config(source) else source
            if source is None:
                raise ValueError(f"{key}.source: missing; give a file, a folder, a glob or a list")
            store, built = prepare_store(
                source, self._tokenizer, column=node.get("column", "text"),
                store_dir=node.get("store_dir"), token_dtype=node.get("token_dtype", "auto"),
                num_workers=self._num_workers, where=key,
            )
            m = store.manifest
            status = "built" if built else (
                f"linked (the store of the same contents, {store.linked_from})"
                if store.linked_from is not None else
                f"already built (the same store as {done[str(store.path)]})"
                if str(store.path) in done else "already built")
            done.setdefault(str(store.path), key)
            line = (f"tad_prepare: {key}: {status}: {store.path}\n"
                    f"  {store.num_tokens:,} tokens, {store.num_documents:,} documents, "
                    f"{len(m['sources'])} file(s), {m['token_dtype']}, fingerprint {store.fingerprint[:16]}")
            if built:
                b = m["build"]
                line += (f"\n  {b['seconds']:.1f} s, {b['tokens_per_second']:,} tokens/s "
                         f"({b['engine']} engine)")
                if b["engine"] == "batch" and self._num_workers is not None:
                    line += (f"; num_workers={self._num_workers} not used: the Hugging Face "
                             f"tokenizer encodes on every core itself (RAYON_NUM_THREADS "
                             f"limits it)")
            if int(os.environ.get("RANK", "0")) == 0:  # one report under torchrun, not one each
                print(line, flush=True)
            reports.append({"key": key, "path": str(store.path), "built": built,
                            "linked": store.linked_from is not None,
                            "num_tokens": store.num_tokens, "num_documents": store.num_documents,
                            "fingerprint": store.fingerprint})
        return reports


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    """``tune run tad_prepare`` on a parsed config, in this process; returns its reports."""
    resolve_package_paths(cfg)
    recipe = TADPrepareRecipe(cfg)
    recipe.setup(cfg)
    return recipe.prepare()


@reports_user_errors("tad_prepare")
@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point of ``tune run tad_prepare --config ...``."""
    run(cfg)


if __name__ == "__main__":
    sys.argv = resolve_config_argv(sys.argv)
    sys.exit(recipe_main())
