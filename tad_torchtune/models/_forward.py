"""How the recipe runs a torchtune decoder: hidden states and logits without float32 upcasts.

torchtune's ``TransformerDecoder.forward`` returns ``self.output(h).float()``: a float32 copy of
the whole ``[B, T, V]`` logits. The recipe instead runs the layers and the final norm here, and
projects in the model's dtype, so the divergences can upcast chunk by chunk (or, on the fused
path, never materialise the logits at all).

A model may carry ``logit_softcap`` (float): its logits are ``cap * tanh(logits / cap)``, as in
Hugging Face's Gemma2 (final_logit_softcapping=30.0), and ``sliding_window`` (int): each position
attends to that many latest positions, itself included, as Hugging Face's Phi-3 and Mistral
(``models/_window.py``).
"""

import torch
from torch import Tensor, nn
from torchtune.modules import TransformerDecoder
from torchtune.modules.tied_linear import TiedLinear

from tad_torchtune.common import apply_softcap
from tad_torchtune.models._window import model_mask


def output_weight(model: TransformerDecoder) -> Tensor:
    """The ``[V, D]`` output projection weight (the embedding table when tied)."""
    if isinstance(model.output, TiedLinear):
        return model.output.tied_module.weight
    return model.output.weight


def output_bias(model: TransformerDecoder) -> Tensor | None:
    """The ``[V]`` output projection bias (Phi-2's ``lm_head.bias``); None for the families whose
    projection has none (all the others). ``project_logits`` adds it already; a head that
    multiplies by ``output_weight`` itself must add it too."""
    if isinstance(model.output, TiedLinear):
        return None
    return model.output.bias


def logit_softcap(model: nn.Module) -> float | None:
    return getattr(model, "logit_softcap", None)


def supports_flex_attention(device: torch.device | str, *models: nn.Module) -> bool:
    """Whether these models run a flex ``BlockMask`` (``data.document_attention(flex=True)``) with
    flex attention: on CUDA where torchtune dispatches a ``BlockMask`` to it
    (``_SUPPORTS_FLEX_ATTENTION``), and every layer's attention torchtune's
    ``MultiHeadAttention`` (Gemma2's refuses block masks: those models take the dense mask)."""
    from torchtune.modules import MultiHeadAttention
    from torchtune.utils._import_guard import _SUPPORTS_FLEX_ATTENTION

    if torch.device(device).type != "cuda" or not _SUPPORTS_FLEX_ATTENTION:
        return False
    attentions = [m.attn for model in models for m in model.modules() if hasattr(m, "attn")]
    return bool(attentions) and all(isinstance(a, MultiHeadAttention) for a in attentions)


def forward_hidden(
    model: TransformerDecoder,
    tokens: Tensor,
    *,
    mask: Tensor | None = None,
    input_pos: Tensor | None = None,
    hidden_layers: tuple[int, ...] = (),
) -> tuple[Tensor, list[Tensor]]:
    """Run the decoder up to (and including) its final norm.

    Args:
        model: a torchtune ``TransformerDecoder``.
        tokens: ``[B, T]``.
        mask: optional attention mask (packed batches), as ``TransformerDecoder.forward``;
            a model with a sliding window (Phi-3, Mistral: ``models/_window.py``) adds it to
            this mask for rows longer than the window.
        input_pos: optional ``[B, T]`` positions (packed batches).
        hidden_layers: indices of layers whose INPUT hidden state is also returned; ``-1`` or
            ``len(layers)`` means the final normed hidden state.

    Returns:
        ``(h [B, T, D] after the final norm, [hidden states requested])``.
    """
    n_layers = len(model.layers)
    wanted = {n_layers if i == -1 else i for i in hidden_layers}
    mask = model_mask(model, tokens, mask=mask, input_pos=input_pos)
    h = model.tok_embeddings(tokens)  # (B, T, D)
    hidden = {}
    for i, layer in enumerate(model.layers):
        if i in wanted:
            hidden[i] = h
        h = layer(h, mask=mask, input_pos=input_pos)
    h = model.norm(h)
    hidden[n_layers] = h
    return h, [hidden[n_layers if i == -1 else i] for i in hidden_layers]


def project_logits(model: TransformerDecoder, h: Tensor) -> Tensor:
    """``[B, T, V]`` logits in the model's dtype (soft-capped when the model says so)."""
    return apply_softcap(model.output(h), logit_softcap(model))
