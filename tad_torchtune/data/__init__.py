"""Data for distillation: corpus files tokenized once into a memory-mapped token store, cut into
fixed-length blocks that keep their document boundaries, and a resumable batch sampler.

- ``text_block_dataset`` / ``TextBlockDataset``: the YAML dataset component; samples
  ``{"tokens", "labels", "document_ids"}``; ``.fingerprint`` and ``.store_path`` identify the
  store it reads.
- ``Batch`` and ``collate``: the typed batch every recipe steps on, made by one collate from the
  samples of any dataset (blocks, torchtune's packed and SFT datasets), labels shifted.
- ``prepare_store``: find or build (once, across processes) the store of a source and tokenizer;
  ``tune run tad_prepare --config CONFIG`` calls it for a config's datasets.
- ``TokenStore``, ``StoreWriter``, ``tokenizer_fingerprint``: the store format (``store``).
- ``ResumableBatchSampler``: global batches in a per-epoch order, resumable at any sample;
  the order computed position by position (``FeistelPermutation``), held nowhere.
"""

from tad_torchtune.data.batch import Batch, collate, document_attention
from tad_torchtune.data.dataset import (
    SPLITS,
    TextBlockDataset,
    text_block_dataset,
    validation_start,
)
from tad_torchtune.data.prepare import (
    STORE_DIR_ENV,
    build_store,
    default_num_workers,
    default_store_dir,
    prepare_store,
)
from tad_torchtune.data.sampler import SAMPLE_ORDERS, FeistelPermutation, ResumableBatchSampler
from tad_torchtune.data.sources import CorpusError, SourceFile, expand_sources, iter_documents, resolve_asset
from tad_torchtune.data.store import StoreError, StoreWriter, TokenStore, tokenizer_fingerprint

__all__ = [
    "SAMPLE_ORDERS", "SPLITS", "STORE_DIR_ENV", "Batch", "CorpusError", "FeistelPermutation",
    "ResumableBatchSampler", "SourceFile",
    "StoreError", "StoreWriter", "TextBlockDataset", "TokenStore", "build_store", "collate",
    "document_attention",
    "default_num_workers", "default_store_dir", "expand_sources", "iter_documents",
    "prepare_store", "resolve_asset", "text_block_dataset", "tokenizer_fingerprint",
    "validation_start",
]
