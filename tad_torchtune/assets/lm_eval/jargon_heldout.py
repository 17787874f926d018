"""Dataset of the ``jargon_heldout`` lm-evaluation-harness task (``jargon_heldout.yaml``)."""

from pathlib import Path


def load(**kwargs):
    """``{"test": Dataset}`` of the documents of ``jargon_heldout.jsonl`` (one ``{"text"}`` per
    line), read with datasets' JSON builder, as ``dataset_path: json`` with ``data_files`` would,
    but from this folder rather than the current one. lm_eval passes the task's ``metadata``."""
    import datasets

    data = Path(__file__).with_name("jargon_heldout.jsonl")
    return datasets.load_dataset("json", data_files={"test": str(data)})
