"""Sliding-window attention (``models/_window.py``): a Phi-3 or Mistral whose config.json has a
``sliding_window`` computes, on rows longer than the window, what transformers computes, on
every path the recipes load and run it (built from config.json alone, or from a builder node
loaded from the folder; plain rows, the dense document mask, a flex ``BlockMask``, KV-cached
decoding); rows up to the window run as before, with no mask where there was none.

transformers' rule (``masking_utils.sliding_window_overlay``): query i sees key j iff
``0 <= i - j < sliding_window``.
"""

import json
import re

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from tad_torchtune.data import document_attention
from tad_torchtune.models import (
    FAMILIES,
    forward_hidden,
    load_hf_folder,
    model_from_hf_config,
    project_logits,
)
from tests.helpers.teachers import (
    ATOL,
    WINDOWED,
    logits_of,
    save_hf_windowed,
    windowed_checkpointer,
    windowed_node,
)

WINDOW = 6
LONG = 28  # rows longer than the window
FAMILY_NAMES = ("mistral", "phi3")
CPU = torch.device("cpu")


def _tokens(rows: int = 2, length: int = LONG, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, WINDOWED["vocab_size"], (rows, length),
                         generator=torch.Generator().manual_seed(seed))


def _hf(folder, **overrides):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                attn_implementation="eager", **overrides).eval()


@torch.no_grad()
def _hf_logits(hf, tokens: torch.Tensor) -> torch.Tensor:
    return hf(tokens).logits.float()


def _loaded(family: str, folder, tmp_path) -> dict:
    """The folder's model as each path loads it: ``tad_eval`` (from its config.json alone, or
    a builder node with torchtune's conversion) and a recipe's teacher (a builder node, the
    folder read by torchtune's checkpointer)."""
    from tad_torchtune.models.loading import load_teacher

    ckpt = OmegaConf.create(windowed_checkpointer(family, folder, tmp_path / "tune_out"))
    entry = {"checkpoint_dir": str(folder), "model": windowed_node(family),
             "model_type": FAMILIES[family].checkpointer_model_type}
    return {"config.json": load_hf_folder(folder, where="students.s", device=CPU,
                                          dtype=torch.float32),
            "tad_eval's builder node": load_hf_folder(entry, where="students.s", device=CPU,
                                                      dtype=torch.float32),
            "recipe's builder node": load_teacher(OmegaConf.create(windowed_node(family)),
                                                  ckpt, device=CPU, dtype=torch.float32)}


def _documents(lengths: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)])
                        for row in lengths])


@torch.no_grad()
def _hf_by_document(hf, tokens: torch.Tensor, lengths: list[list[int]]) -> torch.Tensor:
    """Transformers' logits of each document run alone, put back in its row."""
    rows = []
    for r, row in enumerate(lengths):
        starts = [sum(row[:i]) for i in range(len(row))]
        rows.append(torch.cat([hf(tokens[r:r + 1, s:s + n]).logits for s, n in zip(starts, row)],
                              dim=1))
    return torch.cat(rows).float()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_rows_longer_than_the_window_compute_transformers_logits(family, tmp_path):
    """Plain rows (no mask) of 28 tokens, a window of 6: the package's forward and torchtune's
    own (``model(tokens)``: the Eleuther harness) equal transformers' logits at every
    position, for the model built from config.json and the builder node loaded from the
    folder; transformers' own logits past the window differ from a whole-row attention's by
    far more than the tolerance, so a model without the window cannot pass."""
    folder = save_hf_windowed(tmp_path / family, family, window=WINDOW)
    tokens = _tokens()
    want = _hf_logits(_hf(folder), tokens)
    whole_row = _hf_logits(_hf(folder, sliding_window=None), tokens)
    torch.testing.assert_close(whole_row[:, :WINDOW], want[:, :WINDOW], atol=ATOL, rtol=0)
    assert (whole_row - want)[:, WINDOW:].abs().amax(-1).min() > 100 * ATOL
    for path, model in _loaded(family, folder, tmp_path).items():
        torch.testing.assert_close(logits_of(model, tokens), want, atol=ATOL, rtol=0,
                                   msg=lambda m: f"{path}: {m}")
        with torch.no_grad():
            torch.testing.assert_close(model(tokens), want, atol=ATOL, rtol=0,
                                       msg=lambda m: f"{path}, model(tokens): {m}")


LENGTHS = [[9, 19], [3, 25], [LONG]]  # documents longer and shorter than the window


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_document_masked_rows_compute_each_document_as_transformers_alone(family, tmp_path):
    """The dense document mask (``document_attention``): each document's logits are
    transformers' on that document alone, its window counted from the document's start."""
    folder = save_hf_windowed(tmp_path / family, family, window=WINDOW)
    tokens = _tokens(rows=len(LENGTHS))
    want = _hf_by_document(_hf(folder), tokens, LENGTHS)
    mask, input_pos = document_attention(_documents(LENGTHS))
    for path, model in _loaded(family, folder, tmp_path).items():
        with torch.no_grad():
            got = project_logits(model, forward_hidden(model, tokens, mask=mask,
                                                       input_pos=input_pos)[0])
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=lambda m: f"{path}: {m}")


def _flex_attention_call(original):
    """torchtune's CUDA dispatch (a ``BlockMask`` to flex attention), uncompiled, for a CPU."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    def call(q, k, v, mask, dropout_p, is_causal):
        if isinstance(mask, BlockMask):
            return flex_attention(q, k, v, block_mask=mask)
        return original(q, k, v, mask=mask, dropout_p=dropout_p, is_causal=is_causal)

    return call


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
def test_a_flex_block_mask_computes_each_document_as_transformers_alone(tmp_path):
    """The flex path (``document_attention(flex=True)``, CUDA in the recipes): torchtune's
    attention runs the ``BlockMask`` the model's window is added to with flex attention
    (uncompiled here, on the CPU); each document's logits are transformers' on it alone."""
    folder = save_hf_windowed(tmp_path / "mistral", "mistral", window=WINDOW)
    tokens = _tokens(rows=len(LENGTHS))
    want = _hf_by_document(_hf(folder), tokens, LENGTHS)
    model = load_hf_folder(folder, where="s", device=CPU, dtype=torch.float32)
    for layer in model.layers:
        layer.attn._attention_call = _flex_attention_call(layer.attn._attention_call)
    mask, input_pos = document_attention(_documents(LENGTHS), flex=True)
    with torch.no_grad():
        got = project_logits(model, forward_hidden(model, tokens, mask=mask,
                                                   input_pos=input_pos)[0])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
def test_plain_rows_run_a_flex_band_where_flex_attention_runs(tmp_path, monkeypatch):
    """Plain rows longer than the window on a machine where the model runs flex attention
    (CUDA: ``supports_flex_attention``, made true here): the layers receive the band as one flex
    ``BlockMask`` (not SDPA's dense mask, which loses the flash kernel), reused by later
    forwards of the same length, and torchtune's attention runs it with flex attention
    (uncompiled, on the CPU) into transformers' logits. Rows up to the window keep no mask."""
    from torch.nn.attention.flex_attention import BlockMask

    from tad_torchtune.models import _forward
    from tad_torchtune.models._window import model_mask

    folder = save_hf_windowed(tmp_path / "phi3", "phi3", window=WINDOW)
    tokens = _tokens(rows=3)
    want = _hf_logits(_hf(folder), tokens)
    model = load_hf_folder(folder, where="s", device=CPU, dtype=torch.float32)
    for layer in model.layers:
        layer.attn._attention_call = _flex_attention_call(layer.attn._attention_call)
    plain = load_hf_folder(folder, where="s", device=CPU, dtype=torch.float32)
    assert model_mask(plain, tokens, mask=None) is not None  # the dense band, flex or not
    monkeypatch.setattr(_forward, "supports_flex_attention", lambda device, *models: True)
    band = model_mask(model, tokens, mask=None)
    assert isinstance(band, BlockMask) and model_mask(model, tokens, mask=None) is band
    assert model_mask(model, tokens[:, :WINDOW], mask=None) is None
    with torch.no_grad():
        got = project_logits(model, forward_hidden(model, tokens)[0])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
def test_every_mask_kind_gets_the_naive_window():
    """``windowed_mask`` on rows of 300 positions (flex's blocks are 128), a window of 50:
    no mask, the dense document mask and the flex ``BlockMask`` (its ``mask_mod`` evaluated at
    every (query, key), and flex attention over its blocks against SDPA under the naive mask)
    each equal the naive rule: same document, ``0 <= i - j < 50``."""
    from torch.nn.attention.flex_attention import create_mask, flex_attention

    from tad_torchtune.models._window import windowed_mask

    window, lengths = 50, [[40, 150, 110], [300], [1, 128, 171]]
    docs = _documents(lengths)
    rows, length = docs.shape
    i = torch.arange(length)
    near = (i[:, None] - i[None, :] >= 0) & (i[:, None] - i[None, :] < window)  # (T, T)
    naive = near & (docs[:, :, None] == docs[:, None, :])  # (B, T, T)

    assert torch.equal(windowed_mask(None, window, kv_len=length), near[None])
    band = windowed_mask(None, window, kv_len=length, flex=True)  # batch and heads broadcast
    assert band.shape == (1, 1, length, length)
    # device: a CUDA build of torch makes the mask on the GPU otherwise (torch 2.11)
    assert torch.equal(create_mask(band.mask_mod, 1, 1, length, length, device="cpu")[0, 0],
                       near)
    dense, _ = document_attention(docs)
    assert torch.equal(windowed_mask(dense, window, kv_len=length), naive)
    block, _ = document_attention(docs, flex=True)
    windowed = windowed_mask(block, window, kv_len=length)
    assert windowed.BLOCK_SIZE == block.BLOCK_SIZE
    assert torch.equal(create_mask(windowed.mask_mod, rows, 1, length, length,
                                   device="cpu")[:, 0], naive)
    q, k, v = torch.randn(3, rows, 2, length, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=windowed),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=naive[:, None]),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=band),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=near),
                               atol=1e-5, rtol=1e-5)
    # fewer blocks visited (partial and full) than under the document mask: those wholly out
    # of the window are skipped

    def visited(mask):
        return int(mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum())

    assert visited(windowed) < visited(block)
    blocks = -(-length // 128)
    assert visited(band) < blocks * (blocks + 1) // 2  # fewer than the causal mask's


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_rows_up_to_the_window_run_as_without_one(family, tmp_path):
    """Rows of at most W tokens: the layers receive the mask they received without a window
    (None: torchtune's causal SDPA; the document mask itself), and the logits are bit for bit
    those of the same weights without a window; one token more and they receive the band."""
    from tad_torchtune.models._window import set_sliding_window

    folder = save_hf_windowed(tmp_path / family, family, window=WINDOW)
    model = load_hf_folder(folder, where="s", device=CPU, dtype=torch.float32)
    seen = []
    model.layers[0].register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("mask")),
                                              with_kwargs=True)
    tokens = _tokens(length=WINDOW)
    windowed = logits_of(model, tokens)
    with torch.no_grad():
        model(tokens)
    dense, input_pos = document_attention(_documents([[2, WINDOW - 2], [WINDOW]]))
    with torch.no_grad():
        forward_hidden(model, tokens, mask=dense, input_pos=input_pos)
    assert seen[:2] == [None, None] and seen[2] is dense
    set_sliding_window(model, None)
    assert torch.equal(logits_of(model, tokens), windowed)

    set_sliding_window(model, WINDOW)
    logits_of(model, _tokens(length=WINDOW + 1))
    assert seen[-1] is not None and seen[-1].shape == (1, WINDOW + 1, WINDOW + 1)


def test_kv_cached_decoding_keeps_the_window(tmp_path):
    """torchtune's KV-cached decoding (its generation, the Eleuther harness's generate tasks),
    a prompt of 4 then one token at a time to 28: each position's logits are transformers'
    on the whole row."""
    folder = save_hf_windowed(tmp_path / "mistral", "mistral", window=WINDOW)
    tokens = _tokens(rows=1)
    want = _hf_logits(_hf(folder), tokens)
    model = load_hf_folder(folder, where="s", device=CPU, dtype=torch.float32)
    model.setup_caches(batch_size=1, dtype=torch.float32, decoder_max_seq_len=LONG)
    causal = torch.ones(LONG, LONG, dtype=torch.bool).tril()
    steps = [(0, 4)] + [(p, p + 1) for p in range(4, LONG)]
    with torch.no_grad():
        got = torch.cat([model(tokens[:, a:b], mask=causal[None, a:b],
                               input_pos=torch.arange(a, b)[None]) for a, b in steps], dim=1)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_config_json_windows_read_as_transformers_reads_them(tmp_path):
    """A config.json without ``sliding_window`` means transformers' default (Mistral 4096,
    Phi-3 none), null none; a value that is not a positive integer is refused in one line
    naming the file's key, the value and what is accepted, by ``model_from_hf_config`` and,
    for a builder node, by ``check_model_fits_checkpoint`` before anything is built."""
    import transformers

    from tad_torchtune.errors import ConfigError
    from tad_torchtune.models import sliding_window
    from tad_torchtune.models.loading import check_model_fits_checkpoint

    defaults = {"mistral": transformers.MistralConfig().sliding_window,
                "phi3": transformers.Phi3Config().sliding_window}
    assert defaults == {"mistral": 4096, "phi3": None}
    for family in FAMILY_NAMES:
        folder = save_hf_windowed(tmp_path / family, family, window=WINDOW)
        cfg = json.loads((folder / "config.json").read_text())
        absent = {k: v for k, v in cfg.items() if k != "sliding_window"}
        for hf, window in ((cfg, WINDOW), (absent, defaults[family]),
                           ({**cfg, "sliding_window": None}, None)):
            with torch.device("meta"):
                assert sliding_window(model_from_hf_config(hf)[0]) == window
        for bad in (0, -4, 2.5, "4096", True):
            with pytest.raises(ValueError, match=re.escape(
                    f"students.s: no registered model family builds model_type='{family}' "
                    f"({family}: sliding_window must be a positive integer or null, got "
                    f"{bad!r})")):
                model_from_hf_config({**cfg, "sliding_window": bad}, where="students.s")
        (folder / "config.json").write_text(json.dumps({**cfg, "sliding_window": 0}))
        with pytest.raises(ConfigError, match=(
                rf"^teacher_model._component_: {FAMILIES[family].component} cannot build the "
                rf"model of .*config.json: {family}: sliding_window must be a positive integer "
                rf"or null, got 0$")):
            check_model_fits_checkpoint(
                OmegaConf.create(windowed_node(family)),
                OmegaConf.create(windowed_checkpointer(family, folder, tmp_path / "out")),
                model_key="teacher_model", checkpointer_key="teacher_checkpointer")
