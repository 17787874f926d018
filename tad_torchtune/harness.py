"""lm-evaluation-harness support: the shipped local task and ``tad_eval`` blocks that score exactly
what that harness scores.

``TASKS_DIR`` is the folder of the tasks shipped in the package (``include_path`` of lm_eval and
of the ``eleuther_eval_student`` config): ``jargon_heldout``, the perplexity of a model on the
bundled demo's 179 held-out documents.

``rolling_window_dataset`` cuts documents into the windows of lm_eval's ``loglikelihood_rolling``
requests (perplexity tasks) and yields them as ``tad_eval`` blocks, so that ``tad_eval``'s
cross-entropy times its token count is the negative of the harness's total log-likelihood, token
for token, with the same context for each prediction::

    tune run tad_eval --config demo_eval students.s.checkpoint_dir=DIR \\
        dataset._component_=tad_torchtune.harness.rolling_window_dataset \\
        dataset.source=pkg://lm_eval/jargon_heldout.jsonl dataset.max_length=255 \\
        '~dataset.max_seq_len' '~dataset.split' '~dataset.validation_fraction'

lm_eval's windows (``get_rolling_token_windows(context_len=1)`` then ``make_disjoint_window``),
for a document of n tokens ``x_0 .. x_{n-1}`` (encoded without BOS/EOS) and a model length L:
the first window predicts ``x_0 .. x_{min(L, n)-1}`` from the prefix token (BOS) and the tokens
before each; every later window predicts the next ``m = min(L, n - done)`` tokens, and its
context is the ``L - m + 1`` tokens before them (one for a full window, more for the last, short
one), so that its input is exactly L tokens. Every token is predicted once.

This differs from ``tad_eval`` on ``text_block_dataset`` (fixed blocks of the token stream
``BOS + document + EOS``, concatenated): there the BOS/EOS are predicted too, blocks straddle
documents and the first token of each block has no context; hence its perplexity is not the
harness's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from tad_torchtune.checks import check_int
from tad_torchtune.data import expand_sources, iter_documents, resolve_asset
from tad_torchtune.vocab import encode_text

#: the lm-evaluation-harness tasks shipped in the package (``pkg://lm_eval``)
TASKS_DIR = Path(__file__).parent / "assets" / "lm_eval"

IGNORE_INDEX = -100


def rolling_windows(
    tokens: list[int], *, prefix_id: int, max_length: int
) -> list[tuple[list[int], list[int]]]:
    """lm_eval's disjoint rolling windows of one document (see the module docstring).

    Args:
        tokens: the document's token ids, without special tokens.
        prefix_id: the token the first window conditions on (the BOS).
        max_length: the model length L: tokens a window's input holds.

    Returns:
        ``(context, continuation)`` pairs; the model reads ``(context + continuation)[:-1]`` and
        is scored on ``continuation``. Empty for an empty document.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    n = len(tokens)
    if n == 0:
        return []
    done = min(max_length, n)
    windows = [([prefix_id], tokens[:done])]
    while done < n:
        m = min(max_length, n - done)
        end = done + m
        windows.append((tokens[end - max_length - 1 : end - m], tokens[end - m : end]))
        done = end
    return windows


class RollingWindowDataset(Dataset):
    """Documents as lm_eval's rolling windows, in ``tad_eval``'s block format.

    Each window is one sample of ``max_length + 1`` tokens: ``context + continuation``, padded at
    the end with ``pad_id``; its labels are ``IGNORE_INDEX`` on the context and the padding and the
    tokens themselves on the continuation. ``tad_eval`` (and ``tad_distill``'s validation) shift
    labels left, so position t is scored on ``labels[t + 1]``: exactly the continuation, each
    token from the same context as in lm_eval. Padding comes after every scored position, so a
    causal model's scores do not depend on it.

    Args:
        tokenizer: a torchtune tokenizer (``encode(text, add_bos, add_eos)``, ``bos_id``; ``pad_id``
            when it has one, else 0 pads).
        source: documents, as ``text_block_dataset``'s ``source`` (``pkg://`` paths allowed).
        max_length: lm_eval's ``max_length`` L (the model's, or ``max_length=`` in its
            ``--model_args``); the model must take L + 1 positions.
        column: text field of JSON lines and parquet files.
        max_documents: only the first N documents, as lm_eval's ``limit: N`` (None: all).
    """

    def __init__(self, tokenizer: Any, *, source: str | list[str], max_length: int,
                 column: str = "text", max_documents: int | None = None) -> None:
        check_int(max_length, "dataset.max_length")
        check_int(max_documents, "dataset.max_documents", optional=True)
        sources = [source] if isinstance(source, str) else list(source)
        pad_id = getattr(tokenizer, "pad_id", None)
        pad_id = 0 if pad_id is None else pad_id
        length = max_length + 1
        docs = [doc for file in expand_sources([resolve_asset(str(s)) for s in sources])
                for doc in iter_documents(file, column=column)][:max_documents]
        self.samples: list[dict[str, list[int]]] = []
        for doc in docs:
            ids = encode_text(tokenizer, doc)
            for context, continuation in rolling_windows(ids, prefix_id=tokenizer.bos_id,
                                                         max_length=max_length):
                pad = length - len(context) - len(continuation)
                self.samples.append({
                    "tokens": context + continuation + [pad_id] * pad,
                    "labels": [IGNORE_INDEX] * len(context) + continuation + [IGNORE_INDEX] * pad,
                })
        if not self.samples:
            raise ValueError(f"dataset.source: no document with any token in {source!r}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.samples[index]


#: Builder for YAML: ``_component_: tad_torchtune.harness.rolling_window_dataset``; the class
#: itself, so that a missing or unknown argument is named against its signature
rolling_window_dataset = RollingWindowDataset
