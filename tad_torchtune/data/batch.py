"""The batch every recipe steps on, and the one collate that makes it from any dataset's samples.

``collate`` takes the samples of ``TextBlockDataset`` (equal-length blocks with their document
ids, and a teacher cache's entries when the dataset carries them), of torchtune's packed
datasets (``input_pos``, ``seq_lens``) and of torchtune's instruct/SFT datasets (token lists of
any length, padded), and returns a ``Batch`` whose labels are already shifted: position t
predicts ``labels[t]`` (``docs/design.md``, "The batch").
"""

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from tad_torchtune.common import IGNORE_INDEX, shift_labels


@dataclass
class Batch:
    """A batch of rows ready for the models and the losses.

    Attributes:
        tokens: ``[B, T]`` int64 input ids.
        labels: ``[B, T]`` int64, SHIFTED: position t predicts ``labels[t]``, ``IGNORE_INDEX``
            where nothing counts (padding, a prompt, each row's last position, and in packed
            rows each sample's last, which alone in a row would predict nothing).
        document_ids: ``[B, T]`` the document of each token within its row (0 for the row's
            first), or None when a row is one sequence.
        mask: attention mask of packed rows (``[B, T, T]`` bool or a flex ``BlockMask``), or
            None for plain causal attention.
        input_pos: ``[B, T]`` positions (restarting at each packed document), or None.
        teacher: a teacher cache's entries of these positions (``[B, T, ...]``,
            ``tad_torchtune.losses.cached``), or None.
        num_tokens: valid positions (labels not ignored), counted on the host when collated.
        packed: rows of torchtune's ``PackedDataset``, whose samples never attend to each other:
            ``with_attention`` masks them whatever ``document_mask`` says.
    """

    tokens: Tensor
    labels: Tensor
    document_ids: Tensor | None = None
    mask: Any = None
    input_pos: Tensor | None = None
    teacher: Any = None
    num_tokens: int = 0
    packed: bool = False

    def to(self, device: torch.device | str) -> "Batch":
        """The batch on ``device`` (tensors copied without blocking; the mask and the cache's
        entries through their own ``to``)."""
        def move(x: Any) -> Any:
            if isinstance(x, Tensor):
                return x.to(device, non_blocking=True)
            return None if x is None else x.to(device)

        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)
                                if f.name not in ("num_tokens", "packed")})

    def with_attention(self, document_mask: bool, *, flex: bool = False) -> "Batch":
        """The batch with the attention its models run: stopping at its documents where
        ``document_mask`` (the recipes' key) asks for it or the rows are ``packed``
        (``with_document_mask``), else as it is."""
        return self.with_document_mask(flex=flex) if document_mask or self.packed else self

    def with_document_mask(self, *, flex: bool = False) -> "Batch":
        """The batch with attention stopping at its documents (``document_attention``); rows
        without document ids, or with a mask already, are left as they are."""
        if self.document_ids is None or self.mask is not None:
            return self
        mask, input_pos = document_attention(self.document_ids, flex=flex)
        # packed rows keep torchtune's positions (those of a split sample's rest go on)
        return replace(self, mask=mask, input_pos=input_pos if self.input_pos is None
                       else self.input_pos)

    def ignoring_all(self) -> "Batch":
        """The same inputs with no position counted (a rank's padding batch in evaluation)."""
        return replace(self, labels=torch.full_like(self.labels, IGNORE_INDEX), num_tokens=0)


def collate(samples: list[dict[str, Any]], *, pad_id: int = 0,
            ignore_index: int = IGNORE_INDEX) -> Batch:
    """Stack (or pad) samples into a ``Batch`` and shift its labels.

    Args:
        samples: B dicts with ``tokens`` and ``labels`` (lists or tensors) and optionally
            ``document_ids`` (``TextBlockDataset``), ``input_pos`` and ``seq_lens`` (torchtune's
            packed datasets) and ``teacher`` (a teacher cache's entries of the sample's block).
        pad_id: token of the padding of rows shorter than the longest (SFT samples).
        ignore_index: label of positions that do not count.

    Returns:
        ``Batch``; packed rows get their ``document_ids`` from ``input_pos`` and ``packed``: the
        mask is made on the models' device by ``with_document_mask`` (torchtune's collate would
        make it here, a flex ``BlockMask`` on any CUDA machine, which Gemma2's attention
        refuses).
    """
    first = samples[0]

    def stacked(key: str) -> Tensor:
        return torch.stack([torch.as_tensor(s[key]) for s in samples]).long()

    if "input_pos" in first:  # torchtune's packed rows, each padded to the pack size
        input_pos = stacked("input_pos")
        # a document starts where its positions restart, and at a row's start: with
        # split_across_pack (text_completion_dataset's default) a row may begin with the rest
        # of a sample the row before holds the start of, its positions going on from there
        starts = input_pos == 0
        starts[:, 0] = True
        batch = Batch(stacked("tokens"), stacked("labels"),
                      document_ids=starts.long().cumsum(-1) - 1, input_pos=input_pos,
                      packed=True)
    elif len({len(s["tokens"]) for s in samples}) == 1:  # equal lengths: blocks
        batch = Batch(stacked("tokens"), stacked("labels"),
                      document_ids=stacked("document_ids") if "document_ids" in first else None)
    else:
        from torchtune.data import padded_collate_sft

        out = padded_collate_sft(samples, padding_idx=pad_id, ignore_idx=ignore_index)
        batch = Batch(out["tokens"].long(), out["labels"].long())
    if first.get("teacher") is not None:
        batch.teacher = type(first["teacher"]).stack([s["teacher"] for s in samples])
    batch.labels = shift_labels(batch.labels, ignore_index)
    if batch.packed:  # a sample's last position would predict the next sample's first token,
        # which no unpacked row trains (its end is its row's): ignored, as each sample alone
        ends = batch.document_ids[:, 1:] != batch.document_ids[:, :-1]
        batch.labels[:, :-1].masked_fill_(ends, ignore_index)
    batch.num_tokens = int((batch.labels != ignore_index).sum())
    return batch


def document_attention(document_ids: Tensor, *, flex: bool = False) -> tuple[Any, Tensor]:
    """Attention that stops at document boundaries, for rows packed with several documents.

    Args:
        document_ids: ``[B, T]`` the document of each token within its row (non-decreasing).
        flex: a flex-attention ``BlockMask`` on ``document_ids``' device (torchtune's attention
            runs it with flex attention on CUDA, skipping the blocks no document reaches;
            ``models.supports_flex_attention`` says where) instead of the dense ``[B, T, T]``
            boolean mask (every family, every device).

    Returns:
        ``(mask, input_pos)`` for ``forward_hidden``: token i attends to token j iff j <= i in
        the same document, and its position restarts at 0 at every document start, so each
        document is computed as if it ran alone.
    """
    rows, length = document_ids.shape
    pos = torch.arange(length, device=document_ids.device).expand(rows, length)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    # position of each token's document start: the running maximum of start positions
    first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values
    input_pos = pos - first
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document_causal(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return (document_ids[b, q] == document_ids[b, kv]) & (kv <= q)

        mask = create_block_mask(same_document_causal, rows, None, length, length,
                                 device=document_ids.device)
        return mask, input_pos
    same = document_ids.unsqueeze(-1) == document_ids.unsqueeze(-2)  # (B, T, T)
    causal = torch.ones(length, length, dtype=torch.bool, device=document_ids.device).tril_()
    return same & causal, input_pos
