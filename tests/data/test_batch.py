"""``collate`` and ``Batch``: one collate for the token store's blocks, torchtune's packed rows and
its SFT samples, against torchtune's own collates and the shift of causal LM training."""

import warnings

import torch
from torchtune.data import padded_collate_packed, padded_collate_sft

from tad_torchtune.common import IGNORE_INDEX
from tad_torchtune.data import Batch, collate, document_attention, text_block_dataset
from tad_torchtune.losses.cached import TeacherTopM

DEMO = "pkg://demo/jargon.jsonl.gz"


def shifted(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t+1; the last position predicts nothing (the definition)."""
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, :-1] = labels[:, 1:]
    return out


def test_blocks_are_stacked_with_their_documents_and_labels_shifted(demo_tok):
    ds = text_block_dataset(demo_tok, source=DEMO, max_seq_len=32)
    samples = [ds[i] for i in (3, 0, 7)]
    batch = collate(samples)
    assert isinstance(batch, Batch) and batch.tokens.shape == (3, 32)
    assert batch.tokens[1].tolist() == ds[0]["tokens"].tolist()
    assert batch.document_ids[2].tolist() == ds[7]["document_ids"].tolist()
    stacked = torch.stack([s["labels"] for s in samples])
    assert torch.equal(batch.labels, shifted(stacked))
    assert batch.num_tokens == 3 * 31 and batch.mask is None and batch.teacher is None
    # torchtune's SFT collate stacks equal lengths the same way (before the shift)
    with warnings.catch_warnings():  # torch.tensor(a tensor) warns; the values are the same
        warnings.simplefilter("ignore", UserWarning)
        sft = padded_collate_sft(samples, padding_idx=2, ignore_idx=IGNORE_INDEX)
    assert torch.equal(sft["tokens"], batch.tokens)
    assert torch.equal(shifted(sft["labels"]), batch.labels)


def test_sft_samples_of_several_lengths_are_padded():
    samples = [{"tokens": [5, 6, 7, 8], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 8]},
               {"tokens": [9, 10], "labels": [9, 10]}]
    batch = collate(samples, pad_id=0)
    assert batch.tokens.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch.labels.tolist() == [[IGNORE_INDEX, 7, 8, IGNORE_INDEX],
                                     [10, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch.num_tokens == 3 and batch.document_ids is None


def test_packed_rows_get_documents_mask_and_positions():
    """torchtune's packed samples: its positions, the documents the positions restart at (TAD's
    per-document normaliser reads them) and ``packed``; the mask comes on the models' device
    from ``with_document_mask``: torchtune's block-causal mask, padding included (a pack is
    padded to its size with positions that go on from its last sample's)."""
    samples = [{"tokens": torch.arange(8), "labels": torch.arange(8),
                "input_pos": torch.tensor([0, 1, 2, 0, 1, 0, 1, 2]),
                "seq_lens": torch.tensor([3, 2, 1, 2])},  # the last 2: padding
               {"tokens": torch.arange(8), "labels": torch.arange(8),
                "input_pos": torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]),
                "seq_lens": torch.tensor([5, 3])}]
    batch = collate(samples)
    ref = padded_collate_packed(samples)
    assert batch.packed and batch.mask is None and torch.equal(batch.input_pos, ref["input_pos"])
    assert batch.document_ids.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 1, 1, 1]]
    # a sample's last position predicts nothing, as in a row of its own (before, the next
    # sample's first token: packed and unpacked rows trained other positions)
    assert batch.labels[0].tolist() == [1, 2, IGNORE_INDEX, 4, IGNORE_INDEX, 6, 7, IGNORE_INDEX]
    assert batch.labels[1].tolist() == [1, 2, 3, 4, IGNORE_INDEX, 6, 7, IGNORE_INDEX]
    assert batch.num_tokens == 11
    masked = batch.to("cpu").with_attention(document_mask=False)  # packed: masked anyway
    assert masked.packed and torch.equal(masked.input_pos, ref["input_pos"])
    # the same attention as torchtune's for every real token (rows of the padding differ: it
    # attends as part of the last sample, torchtune's as a sample of its own; nothing reads it)
    real = torch.tensor([[1] * 6 + [0] * 2, [1] * 8], dtype=torch.bool)
    assert torch.equal(masked.mask[real], ref["mask"][real])


def test_a_packed_row_that_starts_with_the_rest_of_a_split_sample():
    """torchtune's ``split_across_pack`` (``text_completion_dataset``'s default): a row may start
    with the rest of a sample, at positions that go on from the row before. It is the row's first
    document (ids from 0: TAD's per-document normaliser indexes by them), attends as torchtune's
    mask says, keeps torchtune's positions, and TAD with ``abar_scope: document`` on it equals
    the naive per-document reference."""
    from tad_torchtune.losses import TADLoss
    from tests.losses import reference as ref

    samples = [{"tokens": torch.arange(8), "labels": torch.arange(8),
                "input_pos": torch.tensor([5, 6, 7, 0, 1, 2, 0, 1]),
                "seq_lens": torch.tensor([3, 3, 2])},
               {"tokens": torch.arange(8), "labels": torch.arange(8),
                "input_pos": torch.tensor([2, 3, 0, 1, 2, 3, 4, 5]),
                "seq_lens": torch.tensor([2, 6])}]
    batch = collate(samples)
    assert batch.document_ids.tolist() == [[0, 0, 0, 1, 1, 1, 2, 2], [0, 0, 1, 1, 1, 1, 1, 1]]
    masked = batch.with_attention(document_mask=False)
    ref_batch = padded_collate_packed(samples)
    assert torch.equal(masked.mask, ref_batch["mask"])
    assert torch.equal(masked.input_pos, torch.stack([s["input_pos"] for s in samples]))
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 8, 11, generator=gen, dtype=torch.float64)
    teacher = torch.randn(2, 8, 11, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, 11, (2, 8), generator=gen)
    loss = TADLoss(k=2, abar_scope="document")
    value = loss.sum_and_count(student, teacher, labels, document_ids=batch.document_ids).mean()
    expected = ref.tad_per_document(student, teacher, labels, batch.document_ids, 2, 2.0)
    torch.testing.assert_close(value, expected, atol=1e-10, rtol=1e-10)


def test_teacher_cache_entries_travel_with_their_blocks():
    def entries(seed):
        g = torch.Generator().manual_seed(seed)
        return TeacherTopM(torch.randint(0, 50, (8, 4), generator=g), torch.randn(8, 4, generator=g),
                           torch.randn(8, generator=g), torch.randn(8, generator=g))

    samples = [{"tokens": torch.arange(8), "labels": torch.arange(8), "teacher": entries(i)}
               for i in range(3)]
    batch = collate(samples)
    assert isinstance(batch.teacher, TeacherTopM) and batch.teacher.ids.shape == (3, 8, 4)
    for i in range(3):
        assert torch.equal(batch.teacher.logp[i], entries(i).logp)
    moved = batch.to("cpu")
    assert isinstance(moved.teacher, TeacherTopM) and torch.equal(moved.teacher.ids, batch.teacher.ids)


def test_document_mask_and_ignoring_all():
    docs = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
    batch = Batch(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long),
                  document_ids=docs, num_tokens=10)
    masked = batch.with_document_mask()
    mask, pos = document_attention(docs)
    assert torch.equal(masked.mask, mask) and torch.equal(masked.input_pos, pos)
    assert pos.tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert not masked.mask[0, 3, 1] and masked.mask[0, 3, 2]  # no attention across documents
    assert masked.with_document_mask() is masked  # a mask is kept
    # the recipes' document_mask: blocks are masked only when it asks
    assert batch.with_attention(document_mask=False) is batch
    assert torch.equal(batch.with_attention(document_mask=True).mask, mask)
    silent = batch.ignoring_all()
    assert (silent.labels == IGNORE_INDEX).all() and silent.num_tokens == 0
    assert torch.equal(silent.tokens, batch.tokens)


def test_the_flex_block_mask_attends_as_the_dense_mask():
    """document_attention(flex=True): flex attention under its BlockMask equals SDPA under the
    dense mask, on rows of several documents spanning flex's 128-token blocks, and skips the
    blocks no document reaches."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    lengths = [[50, 150, 60], [260], [1, 128, 131]]
    docs = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)])
                        for row in lengths])
    dense, pos = document_attention(docs)
    block, flex_pos = document_attention(docs, flex=True)
    assert torch.equal(pos, flex_pos)
    q, k, v = torch.randn(3, 3, 2, 260, 16, generator=torch.Generator().manual_seed(0)).unbind(0)
    with warnings.catch_warnings():  # eager flex attention (the reference implementation) warns
        warnings.simplefilter("ignore")
        got = flex_attention(q, k, v, block_mask=block)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # [B, query blocks, key blocks]: 1 where any pair attends. Row 0's last block (tokens
    # 256..259, in the document of 200..259) skips block 0, and so does row 2's (129..259);
    # row 1, one document, keeps every causal block
    blocks = block.to_dense()[:, 0]
    assert blocks[0].tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    assert blocks[1].tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert blocks[2].tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
