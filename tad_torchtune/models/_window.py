"""Sliding-window attention for torchtune decoders whose attention has none (Phi-3, Mistral).

Hugging Face's Phi-3 and Mistral attend from position i to j only when ``0 <= i - j < W``
(``sliding_window`` in config.json: 2047 for Phi-3-mini-4k, 4096 for Mistral-7B-v0.1), the W
latest positions including i itself (``transformers/masking_utils.py``,
``sliding_window_overlay``: ``kv_idx > q_idx - sliding_window``). torchtune's ``phi3`` and
``mistral`` builders attend over the whole row. ``set_sliding_window`` gives such a model the
window as ``model.sliding_window`` (the convention, like ``logit_softcap``, that the package
reads), and ``windowed_mask`` folds it into the attention mask its layers receive, once per
forward: in ``forward_hidden`` (the recipes' forward) and, through a forward pre-hook, in
``model(tokens)`` (torchtune's own callers: the Eleuther harness, generation with KV caches).

Only rows longer than the window change: up to W positions every key is in the window, so the
mask stays what it was (None: torchtune's causal SDPA, as fast as without a window). Longer
rows without a mask get the causal band: a flex ``BlockMask`` where the model runs flex
attention (CUDA, ``supports_flex_attention``: the blocks out of the band are skipped, and the
kernel stays a flash one, which SDPA with a dense mask is not), else a dense ``[1, T, T]`` bool
band. A given mask gets the band ANDed in: the dense document mask as a bool, a flex
``BlockMask`` through a ``mask_mod`` that adds the window to the given one. Positions in the window are row positions (``i - j``): a document of
a packed row sees the same window as when it runs alone.
"""

from typing import Any

import torch
from torch import Tensor, nn


def sliding_window(model: nn.Module) -> int | None:
    """The window a model's attention is limited to (``set_sliding_window``), or None."""
    return getattr(model, "sliding_window", None)


def set_sliding_window(model: nn.Module, window: int | None) -> nn.Module:
    """Limit every position of ``model`` (a torchtune ``TransformerDecoder``) to the ``window``
    latest positions, itself included (None: the whole row). Idempotent; returns ``model``."""
    assert window is None or (isinstance(window, int) and window > 0), window
    model.sliding_window = window
    if not getattr(model, "_sliding_window_hook", False):
        model.register_forward_pre_hook(_windowed_forward, with_kwargs=True)
        model._sliding_window_hook = True
    return model


def _windowed_forward(model: nn.Module, args: tuple, kwargs: dict[str, Any]):
    # TransformerDecoder.forward(tokens, *, mask=None, encoder_input=None, encoder_mask=None,
    # input_pos=None)
    tokens = args[0] if args else kwargs["tokens"]
    kwargs["mask"] = model_mask(model, tokens, mask=kwargs.get("mask"),
                                input_pos=kwargs.get("input_pos"))
    return args, kwargs


def model_mask(model: nn.Module, tokens: Tensor, *, mask: Any,
               input_pos: Tensor | None = None) -> Any:
    """The attention mask ``model``'s layers must receive for a forward of ``tokens``
    (``[B, T]``) given ``mask`` (``TransformerDecoder.forward``'s): ``mask`` itself for a model
    without a window, else ``windowed_mask``. With KV caches enabled (decoding) the queries sit at
    ``input_pos`` and the keys at the cache's slots."""
    window = sliding_window(model)
    if window is None:
        return mask
    if model.caches_are_enabled():
        if mask is None or input_pos is None:  # torchtune's own error follows
            return mask
        return windowed_mask(mask, window, kv_len=mask.shape[-1], q_pos=input_pos)
    length = tokens.shape[1]
    if mask is None and length > window:
        band = _flex_band(model, window, length, tokens.device)
        if band is not None:
            return band
    return windowed_mask(mask, window, kv_len=length, device=tokens.device)


def _flex_band(model: nn.Module, window: int, length: int, device: torch.device) -> Any:
    """The causal band of ``window`` over rows of ``length`` as a flex ``BlockMask`` (one for
    every row and head) where the model runs flex attention (``supports_flex_attention``), else
    None; decided and made once per (length, device) and kept on the model: the forwards of
    every step reuse it, without walking the model's modules again."""
    key = (window, length, str(device))
    kept = getattr(model, "_window_flex_band", None)
    if kept is None or kept[0] != key:
        from tad_torchtune.models._forward import supports_flex_attention

        band = (windowed_mask(None, window, kv_len=length, device=device, flex=True)
                if supports_flex_attention(device, model) else None)
        kept = model._window_flex_band = (key, band)
    return kept[1]


def windowed_mask(mask: Any, window: int, *, kv_len: int, q_pos: Tensor | None = None,
                  device: torch.device | str | None = None, flex: bool = False) -> Any:
    """``mask`` with the keys more than ``window - 1`` positions before each query removed.

    Args:
        mask: None (causal attention), a ``[B, Tq, Tkv]`` bool mask (True: attends) or a flex
            ``BlockMask``.
        window: W, the positions each query sees, itself included (``i - j < W``).
        kv_len: Tkv, the keys, at positions ``0..Tkv-1``.
        q_pos: ``[B, Tq]`` the queries' positions (KV-cached decoding); None: the keys' own
            (a row attending to itself, ``Tq = Tkv``).
        device: where the band of a None ``mask`` is made (default: the host).
        flex: the band of a None ``mask`` as a flex ``BlockMask`` (batch and heads of 1,
            broadcast) instead of a bool tensor; only without ``q_pos``.

    Returns:
        ``mask`` itself (the same object) when no key can be out of the window (``Tkv <= W``);
        else a ``[1, T, T]`` causal band for None (a ``BlockMask`` with ``flex``), the bool
        mask ANDed with the band, or a new ``BlockMask`` of the same block size whose
        ``mask_mod`` adds the window.
    """
    if kv_len <= window:
        return mask
    from torch.nn.attention.flex_attention import BlockMask, and_masks, create_block_mask

    if isinstance(mask, BlockMask):
        return _windowed_block_mask(mask, window)
    if mask is None and flex:
        assert q_pos is None, "a flex band is for a row attending to itself"
        return create_block_mask(and_masks(_causal, window_mod(window)), None, None, kv_len,
                                 kv_len, device=device if device is not None else "cpu")
    device = mask.device if mask is not None else device
    kv = torch.arange(kv_len, device=device)
    q = kv if q_pos is None else q_pos.to(device)
    near = q.unsqueeze(-1) - kv < window  # (Tq, Tkv), or (B, Tq, Tkv) from q_pos
    if mask is None:  # the causal band
        return (near & (kv <= q.unsqueeze(-1))).unsqueeze(0)  # (1, T, T)
    return mask & near


def window_mod(window: int):
    """The flex ``mask_mod`` of the window: query ``q`` sees key ``kv`` iff ``q - kv < window``
    (with a causal mask_mod: Hugging Face's ``sliding_window_causal_mask_function``)."""

    def near(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return q - kv < window

    return near


def _causal(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
    return kv <= q


def _windowed_block_mask(mask, window: int):
    from torch.nn.attention.flex_attention import and_masks, create_block_mask

    rows, heads, q_len, kv_len = mask.shape
    return create_block_mask(and_masks(mask.mask_mod, window_mod(window)), rows, heads, q_len,
                             kv_len, device=mask.kv_num_blocks.device, BLOCK_SIZE=mask.BLOCK_SIZE)
