"""Phi-2 (Hugging Face ``model_type='phi'``) built from torchtune's modules.

torchtune 0.6.1 has no Phi-2. Hugging Face's ``PhiForCausalLM`` differs from every torchtune
family in four ways, all built here from torchtune's own modules so that students, export and
the recipes treat it like any other family (``docs/design.md``, "Model families"):

- a PARALLEL block: one LayerNorm (with bias) feeds attention and MLP,
  ``h = x + attn(ln(x)) + mlp(ln(x))`` (``PhiParallelLayer``, its norm is ``sa_norm``);
- partial rotary embeddings: only the first ``rotary_dim = int(partial_rotary_factor *
  head_dim)`` dimensions of each head are rotated, in Hugging Face's ``rotate_half`` layout (pairs
  ``(i, i + rotary_dim / 2)``); the others pass through (Phi-2: 32 of 80);
- biases on q/k/v and the output projection of attention (``dense``), on both MLP layers
  (``fc1 -> GELU(tanh) -> fc2``, a torchtune ``FeedForward`` with ``w1 = fc1``, ``w2 = fc2`` and no
  ``w3``), and LayerNorms (weight and bias) instead of RMSNorms;
- an untied output projection WITH a bias (``lm_head.bias``; ``output_bias`` reads it).

No Hugging Face weight needs permuting: torchtune's ``MultiHeadAttention`` applies the rotary
embedding to ``[b, s, heads, head_dim]`` exactly where Hugging Face does.
"""

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torchtune.models.convert_weights import get_mapped_key
from torchtune.models.phi3._position_embeddings import Phi3RotaryPositionalEmbeddings
from torchtune.modules import (
    FeedForward,
    MultiHeadAttention,
    TransformerDecoder,
    TransformerSelfAttentionLayer,
)

from tad_torchtune.models._families import (
    ModelFamily,
    NotThisFamily,
    refuse_rope_scaling,
    register_family,
)

StateDict = dict[str, Tensor]

# Hugging Face's activations that are GELU with the tanh approximation (Phi-2: gelu_new).
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


def rotary_dim(head_dim: int, partial_rotary_factor: float) -> int:
    """How many leading dimensions of a head the rotary embedding turns, as Hugging Face's
    ``PhiAttention.rotary_ndims`` (``int``, so ``0.4 * 16`` gives 6)."""
    return int(partial_rotary_factor * head_dim)


class PartialRotaryPositionalEmbeddings(nn.Module):
    """Rotary embeddings on the first ``rotary_dim`` dimensions of each head only.

    The rotated part uses torchtune's ``Phi3RotaryPositionalEmbeddings`` over ``rotary_dim``
    dimensions (Hugging Face's ``rotate_half`` layout and frequencies
    ``base ** (-2i / rotary_dim)``); the remaining ``head_dim - rotary_dim`` pass unchanged.

    Args:
        head_dim: size of a head.
        rotary_dim: leading dimensions rotated (even, at most ``head_dim``).
        max_seq_len: length of the cached angles.
        base: RoPE base (Hugging Face's ``rope_theta``).
    """

    def __init__(self, *, head_dim: int, rotary_dim: int, max_seq_len: int, base: float) -> None:
        super().__init__()
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ValueError(
                f"rotary_dim must be even and in (0, head_dim={head_dim}], got {rotary_dim}"
            )
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.rope = Phi3RotaryPositionalEmbeddings(dim=rotary_dim, max_seq_len=max_seq_len,
                                                   base=base)

    def forward(self, x: Tensor, *, input_pos: Tensor | None = None) -> Tensor:
        """``x``: ``[b, s, heads, head_dim]``; ``input_pos``: optional ``[b, s]`` positions."""
        turned, passed = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        return torch.cat([self.rope(turned, input_pos=input_pos), passed], dim=-1)


class PhiParallelLayer(TransformerSelfAttentionLayer):
    """Phi's block: ``x + attn(ln(x)) + mlp(ln(x))`` with ONE LayerNorm, ``sa_norm``.

    A ``TransformerSelfAttentionLayer`` (so torchtune's KV-cache setup and activation
    checkpointing policies find it) whose ``mlp_norm``, ``sa_scale`` and ``mlp_scale`` are the
    parameter-free identities, so its state-dict keys are ``sa_norm.*``, ``attn.*`` and ``mlp.*``.
    """

    def __init__(self, *, attn: MultiHeadAttention, mlp: nn.Module, norm: nn.Module) -> None:
        super().__init__(attn=attn, mlp=mlp, sa_norm=norm)

    def forward(self, x: Tensor, *, mask=None, input_pos: Tensor | None = None,
                **kwargs: Any) -> Tensor:
        """``x``: ``[b, s, embed_dim]``; ``mask`` and ``input_pos`` as torchtune's layer."""
        h = self.sa_norm(x)
        # summed in Hugging Face's order, (attn + mlp) + residual
        return self.attn(h, h, mask=mask, input_pos=input_pos) + self.mlp(h) + x


def phi2(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    head_dim: int | None = None,
    partial_rotary_factor: float = 0.4,
    rope_base: float = 10_000.0,
    norm_eps: float = 1e-5,
) -> TransformerDecoder:
    """A Phi-2 decoder (Hugging Face ``PhiForCausalLM`` with ``qk_layernorm=False``).

    Args:
        vocab_size: rows of the embedding table and the output projection.
        num_layers: number of parallel blocks.
        num_heads: query heads.
        num_kv_heads: key/value heads (Phi-2: ``num_heads``).
        embed_dim: hidden size.
        intermediate_dim: MLP width (``fc1`` output).
        max_seq_len: RoPE cache length.
        head_dim: size of a head (default ``embed_dim // num_heads``).
        partial_rotary_factor: fraction of each head that is rotated (Phi-2: 0.4, so 32 of 80).
        rope_base: RoPE base (``rope_theta``).
        norm_eps: LayerNorm epsilon (``layer_norm_eps``).

    Returns:
        A ``TransformerDecoder`` of ``PhiParallelLayer`` blocks, a final ``nn.LayerNorm`` and an
        untied output ``nn.Linear`` with a bias.

    Raises:
        ValueError: when ``partial_rotary_factor * head_dim`` gives an odd number of rotated
            dimensions (or none), which no rotary embedding can pair.
    """
    head_dim = head_dim or embed_dim // num_heads
    turned = rotary_dim(head_dim, partial_rotary_factor)
    if turned % 2 or turned <= 0:
        raise ValueError(
            f"partial_rotary_factor={partial_rotary_factor} with head_dim={head_dim} rotates "
            f"int({partial_rotary_factor} * {head_dim}) = {turned} dimensions; it must be a "
            f"positive even number (rotary pairs)"
        )
    rope = PartialRotaryPositionalEmbeddings(head_dim=head_dim, rotary_dim=turned,
                                             max_seq_len=max_seq_len, base=rope_base)
    layers = nn.ModuleList()
    for _ in range(num_layers):
        attn = MultiHeadAttention(
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            q_proj=nn.Linear(embed_dim, num_heads * head_dim, bias=True),
            k_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=True),
            v_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=True),
            output_proj=nn.Linear(num_heads * head_dim, embed_dim, bias=True),
            pos_embeddings=rope,
            max_seq_len=max_seq_len,
        )
        mlp = FeedForward(gate_proj=nn.Linear(embed_dim, intermediate_dim, bias=True),
                          down_proj=nn.Linear(intermediate_dim, embed_dim, bias=True),
                          activation=nn.GELU(approximate="tanh"))
        layers.append(PhiParallelLayer(attn=attn, mlp=mlp,
                                       norm=nn.LayerNorm(embed_dim, eps=norm_eps)))
    return TransformerDecoder(
        tok_embeddings=nn.Embedding(vocab_size, embed_dim),
        layers=layers,
        max_seq_len=max_seq_len,
        num_heads=num_heads,
        head_dim=head_dim,
        norm=nn.LayerNorm(embed_dim, eps=norm_eps),
        output=nn.Linear(embed_dim, vocab_size, bias=True),
    )


def phi2_2_7b() -> TransformerDecoder:
    """microsoft/phi-2: 32 layers, hidden 2560, 32 heads of 80 (32 rotated), MLP 10240, vocabulary
    51200 (2.78B parameters; Microsoft says 2.7B, the TAD paper 2.8B)."""
    return phi2(vocab_size=51200, num_layers=32, num_heads=32, num_kv_heads=32, embed_dim=2560,
                intermediate_dim=10240, max_seq_len=2048, partial_rotary_factor=0.4,
                rope_base=10_000.0, norm_eps=1e-5)


# Hugging Face key -> torchtune key; "{}" is the layer index.
_FROM_HF = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.final_layernorm.weight": "norm.weight",
    "model.final_layernorm.bias": "norm.bias",
    "lm_head.weight": "output.weight",
    "lm_head.bias": "output.bias",
    **{f"model.layers.{{}}.{hf}.{kind}": f"layers.{{}}.{tune}.{kind}"
       for hf, tune in (("input_layernorm", "sa_norm"),
                        ("self_attn.q_proj", "attn.q_proj"),
                        ("self_attn.k_proj", "attn.k_proj"),
                        ("self_attn.v_proj", "attn.v_proj"),
                        ("self_attn.dense", "attn.output_proj"),
                        ("mlp.fc1", "mlp.w1"),
                        ("mlp.fc2", "mlp.w2"))
       for kind in ("weight", "bias")},
}
_TO_HF = {tune: hf for hf, tune in _FROM_HF.items()}


def hf_to_tune(state_dict: Mapping[str, Tensor], hf_config: Mapping[str, Any]) -> StateDict:
    """Hugging Face ``PhiForCausalLM`` weights in torchtune's keys (renamed, no permutation).

    Raises:
        Exception: torchtune's ``get_mapped_key`` error for a key outside the mapping (e.g.
            ``q_layernorm`` weights, which ``hf_kwargs`` refuses first).
    """
    return {get_mapped_key(k, _FROM_HF): v for k, v in state_dict.items()}


def tune_to_hf(state_dict: Mapping[str, Tensor], hf_config: Mapping[str, Any]) -> StateDict:
    """The inverse of ``hf_to_tune``."""
    return {get_mapped_key(k, _TO_HF): v for k, v in state_dict.items()}


def hf_kwargs(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The ``phi2`` builder's own kwargs from a ``config.json`` (beyond ``hf_common_kwargs``).

    Reads ``partial_rotary_factor`` at the top level (the Hub's Phi-2 config) or in
    ``rope_parameters`` (what transformers 5 writes), defaulting to transformers' 0.5.

    Raises:
        NotThisFamily: for ``qk_layernorm: true``, RoPE scaling, or an activation other than
            GELU with the tanh approximation.
    """
    rope = hf.get("rope_parameters") or {}
    if hf.get("qk_layernorm"):
        raise NotThisFamily("phi2: no qk_layernorm (Phi-2 has none), got qk_layernorm=true")
    refuse_rope_scaling(hf, "phi2: no RoPE scaling")
    act = hf.get("hidden_act", "gelu_new")
    if act not in TANH_GELUS:
        raise NotThisFamily(f"phi2: the MLP is GELU with the tanh approximation {TANH_GELUS}, "
                            f"got hidden_act={act!r}")
    factor = hf.get("partial_rotary_factor", rope.get("partial_rotary_factor", 0.5))
    return {"partial_rotary_factor": factor, "norm_eps": hf.get("layer_norm_eps", 1e-5)}


# The family, registered as a user registers one (``docs/design.md``, "Model families").
register_family(ModelFamily("phi2", "tad_torchtune.models.phi2", "PHI2", "phi",
                            rope_layout="half", to_hf=tune_to_hf, from_hf=hf_to_tune,
                            hf_kwargs=hf_kwargs))
