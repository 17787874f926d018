"""Make torchtune 0.6.1's Gemma2 compute what Hugging Face's Gemma2 computes.

Three differences, all in ``torchtune/models/gemma2``:

1. ``Gemma2FinalNorm`` applies the final tanh soft-cap to the normed HIDDEN STATE before the
   output projection; Hugging Face (and the Gemma2 paper) cap the LOGITS:
   ``logits = 30 * tanh(logits / 30)``.
2. The model builders (``gemma2_2b``, ``gemma2_9b``, ``gemma2_27b``) pass the two capping values
   swapped: ``hidden_capping_value=30.0`` becomes the attention soft-cap and
   ``final_capping_value=50.0`` the final one, while every released Gemma2 checkpoint uses
   ``attn_logit_softcapping=50.0`` and ``final_logit_softcapping=30.0``.
3. The checkpoint key mapping (``_convert_weights._GEMMA2_FROM_HF``) sends Hugging Face's
   ``post_feedforward_layernorm`` to ``layers.{i}.mlp_norm`` (which
   ``TransformerSelfAttentionLayer`` applies BEFORE the MLP) and ``pre_feedforward_layernorm`` to
   ``layers.{i}.mlp_scale`` (applied AFTER it): a real checkpoint loads with its two
   feed-forward norms swapped.

``correct_gemma2`` fixes all three without touching any parameter, so state-dict keys stay the
same and torchtune's checkpointers load and save the model as before.
"""

import types

from torch import Tensor, nn
from torchtune.models.gemma2._attention import Gemma2Attention
from torchtune.models.gemma2._component_builders import Gemma2FinalNorm
from torchtune.modules import TransformerSelfAttentionLayer

from tad_torchtune.models._forward import apply_softcap

# Hugging Face Gemma2Config defaults, identical in gemma-2-2b, -9b and -27b.
HF_ATTN_LOGIT_SOFTCAPPING = 50.0
HF_FINAL_LOGIT_SOFTCAPPING = 30.0


def is_gemma2(model: nn.Module) -> bool:
    """True for a torchtune Gemma2 decoder (corrected or not)."""
    return isinstance(getattr(model, "norm", None), Gemma2FinalNorm) or any(
        isinstance(m, Gemma2Attention) for m in model.modules()
    )


class Gemma2HFLayer(TransformerSelfAttentionLayer):
    """A Gemma2 layer whose feed-forward norms play the roles torchtune's key mapping gives them.

    Same modules and state-dict keys as ``TransformerSelfAttentionLayer``; only ``forward``
    differs: ``mlp_scale`` (Hugging Face's ``pre_feedforward_layernorm``) normalises the MLP
    input and ``mlp_norm`` (``post_feedforward_layernorm``) its output.
    """

    def forward(self, x: Tensor, *, mask=None, input_pos=None, **kwargs) -> Tensor:
        h = self.sa_norm(x)
        attn_out = self.attn(h, h, mask=mask, input_pos=input_pos)
        h = self.sa_scale(attn_out) + x
        mlp_out = self.mlp(self.mlp_scale(h))
        return h + self.mlp_norm(mlp_out)


def _capped_unembed(self, h: Tensor):
    # TransformerDecoder.unembed, plus the logit soft-cap, so that ``model(tokens)`` agrees with
    # ``project_logits`` (which applies the cap itself after ``model.output``).
    h = self.norm(h)
    if self.num_output_chunks > 0:
        return [apply_softcap(chunk, self.logit_softcap) for chunk in self.chunked_output(h)]
    return apply_softcap(self.output(h).float(), self.logit_softcap)


def correct_gemma2(
    model: nn.Module,
    *,
    attn_logit_softcapping: float | None = HF_ATTN_LOGIT_SOFTCAPPING,
    final_logit_softcapping: float | None = HF_FINAL_LOGIT_SOFTCAPPING,
) -> nn.Module:
    """Give a torchtune Gemma2 Hugging Face's soft-capping; a no-op for any other model.

    The hidden-state cap in ``model.norm.logit_capping`` becomes ``nn.Identity``, every attention
    layer's ``softcapping`` is set to ``attn_logit_softcapping``, every layer becomes a
    ``Gemma2HFLayer`` (feed-forward norms used as Hugging Face uses the weights torchtune's
    checkpointer loads into them), and ``model.logit_softcap`` is
    set to ``final_logit_softcapping`` (the convention ``project_logits`` reads; ``model.forward``
    applies it too). Idempotent: calling it again sets the same values.

    Args:
        model: a torchtune ``TransformerDecoder`` (modified in place).
        attn_logit_softcapping: Hugging Face's ``attn_logit_softcapping`` (None: no cap).
        final_logit_softcapping: Hugging Face's ``final_logit_softcapping`` (None: no cap).

    Returns:
        ``model``.
    """
    if not is_gemma2(model):
        return model
    norm = model.norm
    if isinstance(norm, Gemma2FinalNorm) and not isinstance(norm.logit_capping, nn.Identity):
        norm.logit_capping = nn.Identity()  # holds no parameters: state-dict keys unchanged
    for module in model.modules():
        if isinstance(module, Gemma2Attention):
            module.softcapping = attn_logit_softcapping
        elif isinstance(module, TransformerSelfAttentionLayer) and isinstance(
            module.attn, Gemma2Attention
        ):
            if isinstance(module, Gemma2HFLayer):
                continue
            if type(module) is not TransformerSelfAttentionLayer:
                raise ValueError(
                    f"correct_gemma2: layer of type {type(module).__name__} (already sharded or "
                    f"compiled?) cannot be corrected; call correct_gemma2 right after building "
                    f"the model, before FSDP, activation checkpointing or torch.compile"
                )
            # Swap the roles, not the modules, so checkpoints keep loading under the same keys.
            module.__class__ = Gemma2HFLayer
    model.logit_softcap = final_logit_softcapping
    model.unembed = types.MethodType(_capped_unembed, model)
    return model


def gemma2_hf_config(model: nn.Module, cfg: dict) -> dict:
    """The Gemma2 fields of a corrected model's Hugging Face ``config.json``: the soft-caps, the
    attention scaling and which layers use the sliding window.

    Raises:
        ValueError: for an uncorrected model, which no Hugging Face config can express.
    """
    layers = [getattr(layer, "_checkpoint_wrapped_module", layer) for layer in model.layers]
    if not isinstance(layers[0], Gemma2HFLayer):
        raise ValueError(
            "this torchtune Gemma2 is not corrected (it caps its hidden state and swaps its "
            "feed-forward norms, which no Hugging Face config can express): call "
            "tad_torchtune.models.correct_gemma2(model) first"
        )
    attn = layers[0].attn
    windows = [layer.attn.sliding_window_size for layer in layers]
    return {
        "attn_logit_softcapping": attn.softcapping,
        "final_logit_softcapping": model.logit_softcap,
        "query_pre_attn_scalar": round(attn.scaling**-2),
        "layer_types": ["sliding_attention" if w else "full_attention" for w in windows],
        "sliding_window": next((w for w in windows if w), cfg.get("sliding_window")),
    }
