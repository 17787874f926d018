"""How the package runs a decoder (``models/_forward.py``): its hidden states and logits are
torchtune's own forward for every family (soft-capped Gemma2, tied embeddings, Phi-2's output
bias), the requested layers' inputs come back, and the logits stay in the model's dtype."""

import pytest
import torch

from tad_torchtune.models import (
    forward_hidden,
    logit_softcap,
    output_bias,
    output_weight,
    project_logits,
)
from tests.helpers.teachers import CASES, SEQ, VOCAB, build_teacher


@pytest.mark.parametrize("case", sorted(CASES))
def test_hidden_states_and_logits_are_torchtunes_forward(case):
    model = build_teacher(case)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    inputs = []
    handles = [layer.register_forward_pre_hook(lambda m, args, kw: inputs.append(args[0]),
                                               with_kwargs=True) for layer in model.layers]
    with torch.no_grad():
        expected = model(tokens)  # torchtune: float32 logits of the whole batch
        for h in handles:
            h.remove()
        h, layers = forward_hidden(model, tokens, hidden_layers=(0, 2, -1))
        logits = project_logits(model, h)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(layers[0], inputs[0]) and torch.equal(layers[1], inputs[2])
    assert torch.equal(layers[2], h)
    bias = output_bias(model)
    plain = h @ output_weight(model).T + (0 if bias is None else bias)
    cap = logit_softcap(model)
    assert (cap is not None) == (case == "gemma2") and (bias is not None) == (case == "phi2")
    torch.testing.assert_close(logits, plain if cap is None else cap * torch.tanh(plain / cap),
                               atol=1e-5, rtol=1e-5)
    tied = "tied" in case or case in ("llama3_2", "gemma2")
    assert (output_weight(model) is model.tok_embeddings.weight) == tied


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torchtune RMSNorm
def test_logits_stay_in_the_models_dtype():
    model = build_teacher("llama3").to(torch.bfloat16)
    tokens = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = project_logits(model, forward_hidden(model, tokens)[0])
        assert logits.dtype == torch.bfloat16 and model(tokens).dtype == torch.float32
