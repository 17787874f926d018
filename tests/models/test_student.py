"""Students built from tiny teachers of every family: shapes, copied weights, freezing."""

import re

import pytest
import torch
from torchtune.modules.tied_linear import TiedLinear

from tad_torchtune.models import (
    DistillSpec,
    evenly_spaced_layers,
    forward_hidden,
    init_student_from_teacher,
    project_logits,
    pruned_student,
    resolve_teacher,
)
from tests.helpers.teachers import CASES, SEQ, VOCAB, build_teacher, teacher_node

ALL = list(CASES)


def _student(case, **kwargs):
    teacher = build_teacher(case)
    torch.manual_seed(1)
    kwargs.setdefault("num_layers", 2)
    kwargs.setdefault("intermediate_dim", 24)
    student = pruned_student(teacher=teacher_node(case), **kwargs)
    init_student_from_teacher(student, teacher)
    return teacher, student


def _norms(layer):
    return {k: v for k, v in layer.named_parameters() if "norm" in k or "scale" in k}


def _layer_params(model, i, prefix):
    return {k: v for k, v in model.layers[i].named_parameters() if k.startswith(prefix)}


def test_evenly_spaced_layers_include_first_and_last():
    assert evenly_spaced_layers(36, 18) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 19, 21, 23, 25, 27,
                                            29, 31, 33, 35]
    assert evenly_spaced_layers(42, 14) == [0, 3, 6, 9, 13, 16, 19, 22, 25, 28, 32, 35, 38, 41]
    assert evenly_spaced_layers(4, 2) == [0, 3]
    assert evenly_spaced_layers(5, 3) == [0, 2, 4]
    assert evenly_spaced_layers(7, 1) == [0]
    assert evenly_spaced_layers(6, 6) == list(range(6))


def test_resolve_teacher_reads_model_builders_without_building():
    family, kwargs = resolve_teacher({"_component_": "torchtune.models.qwen2_5.qwen2_5_3b"})
    assert family.name == "qwen2"
    sizes = (kwargs["num_layers"], kwargs["embed_dim"], kwargs["intermediate_dim"])
    assert sizes == (36, 2048, 11008)
    assert kwargs["tie_word_embeddings"] is True
    family, kwargs = resolve_teacher({"_component_": "torchtune.models.gemma2.gemma2_9b"})
    assert (family.name, kwargs["num_layers"], kwargs["head_dim"]) == ("gemma2", 42, 256)
    family, kwargs = resolve_teacher({"_component_": "torchtune.models.llama3_2.llama3_2_1b",
                                      "tie_word_embeddings": False})
    assert (family.name, kwargs["tie_word_embeddings"]) == ("llama3_2", False)


@pytest.mark.parametrize("case", ALL)
def test_student_shape_and_copied_weights(case):
    teacher, student = _student(case)
    spec = student.distill_spec
    assert isinstance(spec, DistillSpec) and spec.teacher_layers == (0, 3)
    assert len(student.layers) == 2
    assert student.layers[0].mlp.w1.weight.shape == (24, 32)
    assert student.layers[0].mlp.w2.weight.shape == (32, 24)
    assert type(student.output) is type(teacher.output)
    # embeddings, final norm (and untied output) bit for bit
    assert torch.equal(student.tok_embeddings.weight, teacher.tok_embeddings.weight)
    for (k, v), (tk, tv) in zip(student.norm.named_parameters(), teacher.norm.named_parameters()):
        assert k == tk and torch.equal(v, tv)
    if not isinstance(student.output, TiedLinear):
        assert torch.equal(student.output.weight, teacher.output.weight)
    for s_i, t_i in enumerate(spec.teacher_layers):
        s_attn, t_attn = _layer_params(student, s_i, "attn"), _layer_params(teacher, t_i, "attn")
        assert s_attn.keys() == t_attn.keys() and s_attn
        for k in s_attn:
            assert torch.equal(s_attn[k], t_attn[k]), (s_i, k)
        s_norms = _norms(student.layers[s_i])
        t_norms = _norms(teacher.layers[t_i])
        assert s_norms.keys() == t_norms.keys() and s_norms
        for k in s_norms:
            assert torch.equal(s_norms[k], t_norms[k]), (s_i, k)
        # fresh MLPs: the builder's initialisation, nothing like the teacher's prefix
        t_w1 = teacher.layers[t_i].mlp.w1.weight[:24]
        assert not torch.allclose(student.layers[s_i].mlp.w1.weight, t_w1, atol=1e-3)
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    logits = project_logits(student, forward_hidden(student, tokens)[0])
    assert logits.shape == (2, SEQ, VOCAB) and torch.isfinite(logits).all()


@pytest.mark.parametrize("case", ALL)
def test_mlp_copy_truncates_teacher_mlp(case):
    teacher, student = _student(case, mlp_init="copy", teacher_layers=[2, 1])
    assert student.distill_spec.teacher_layers == (2, 1)
    for s_i, t_i in enumerate((2, 1)):
        s_mlp, t_mlp = student.layers[s_i].mlp, teacher.layers[t_i].mlp
        for up in ("w1", "w3"):  # [intermediate, embed]; Phi-2 has no w3
            if getattr(t_mlp, up) is None:
                assert getattr(s_mlp, up) is None
                continue
            assert torch.equal(getattr(s_mlp, up).weight, getattr(t_mlp, up).weight[:24])
            if getattr(t_mlp, up).bias is not None:  # Phi-2
                assert torch.equal(getattr(s_mlp, up).bias, getattr(t_mlp, up).bias[:24])
        assert torch.equal(s_mlp.w2.weight, t_mlp.w2.weight[:, :24])
        if t_mlp.w2.bias is not None:
            assert torch.equal(s_mlp.w2.bias, t_mlp.w2.bias)
        assert torch.equal(student.layers[s_i].attn.q_proj.weight,
                           teacher.layers[t_i].attn.q_proj.weight)


@pytest.mark.parametrize("case", ALL)
def test_frozen_embeddings_get_no_grad_and_do_not_move(case):
    _, student = _student(case)
    frozen = {k for k, p in student.named_parameters() if not p.requires_grad}
    expected = {"tok_embeddings.weight"} | (  # an untied output's bias too (Phi-2)
        set() if isinstance(student.output, TiedLinear)
        else {f"output.{k}" for k, _ in student.output.named_parameters()}
    )
    assert frozen == expected
    before = {k: p.detach().clone() for k, p in student.named_parameters()}
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2, weight_decay=0.1)
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    logits = project_logits(student, forward_hidden(student, tokens)[0]).float()
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)
    )
    loss.backward()
    opt.step()
    for k, p in student.named_parameters():
        if k in frozen:
            assert p.grad is None, k
            assert torch.equal(p, before[k]), k
        else:
            assert p.grad is not None, k
            assert not torch.equal(p, before[k]), k


def test_unfrozen_when_asked():
    _, student = _student("qwen2", freeze_embeddings=False)
    assert all(p.requires_grad for p in student.parameters())


# (case, widths, the teacher head's dimensions each student head keeps): narrower embed_dim,
# fewer heads, smaller heads; whole rotary pairs
NARROW = [
    # head_dim 8 -> 4, pairs (i, i + 4): keeps the pairs (0, 4) and (1, 5)
    ("qwen2", dict(embed_dim=16, num_heads=4, num_kv_heads=2), [0, 1, 4, 5]),
    ("phi3", dict(embed_dim=24, num_heads=3, num_kv_heads=1), list(range(8))),  # 4 -> 3 heads
    ("llama3", dict(embed_dim=16, num_heads=2, num_kv_heads=1), list(range(8))),
    # head_dim 16 -> 8, pairs (2i, 2i + 1)
    ("gemma2", dict(embed_dim=24, num_heads=2, num_kv_heads=1, head_dim=8), list(range(8))),
    # head_dim 8 -> 4, of which 4 -> 2 rotated, pairs (i, i + 2): the pair (0, 2), then the
    # first two unrotated dimensions
    ("phi2", dict(embed_dim=16, num_heads=4, num_kv_heads=2), [0, 2, 4, 5]),
]


@pytest.mark.parametrize("case,widths,dims", NARROW, ids=[c for c, _, _ in NARROW])
def test_narrow_student_truncates_per_head(case, widths, dims):
    teacher, student = _student(case, mlp_init="copy", **widths)
    t_dim, t_h, t_kv, t_hd = student.distill_spec.teacher_width
    s_dim, s_h, s_kv, s_hd = student.distill_spec.student_width
    assert s_dim == widths["embed_dim"] and s_h == widths["num_heads"] and len(dims) == s_hd
    assert torch.equal(student.tok_embeddings.weight, teacher.tok_embeddings.weight[:, :s_dim])
    for s_i, t_i in enumerate(student.distill_spec.teacher_layers):
        s_attn, t_attn = student.layers[s_i].attn, teacher.layers[t_i].attn
        for proj, n in (("q_proj", s_h), ("k_proj", s_kv), ("v_proj", s_kv)):
            t_w = getattr(t_attn, proj).weight
            ref = torch.stack([t_w[h * t_hd + d, :s_dim] for h in range(n) for d in dims])
            assert torch.equal(getattr(s_attn, proj).weight, ref), proj
            if getattr(t_attn, proj).bias is not None:
                t_b = getattr(t_attn, proj).bias
                ref_b = torch.stack([t_b[h * t_hd + d] for h in range(n) for d in dims])
                assert torch.equal(getattr(s_attn, proj).bias, ref_b)
        t_o = t_attn.output_proj.weight
        ref_o = torch.stack([t_o[:s_dim, h * t_hd + d] for h in range(s_h) for d in dims], dim=1)
        assert torch.equal(s_attn.output_proj.weight, ref_o)
        if t_attn.output_proj.bias is not None:  # Phi-2's dense.bias: [embed_dim]
            assert torch.equal(s_attn.output_proj.bias, t_attn.output_proj.bias[:s_dim])
        t_w2 = teacher.layers[t_i].mlp.w2.weight
        assert torch.equal(student.layers[s_i].mlp.w2.weight, t_w2[:s_dim, :24])
    tokens = torch.randint(0, VOCAB, (1, SEQ))
    assert torch.isfinite(project_logits(student, forward_hidden(student, tokens)[0])).all()


INVALID_STUDENTS = [  # (pruned_student's arguments, the start of its error: the argument's name)
    (dict(num_layers=5), "num_layers: 5 exceeds the teacher's 4 layers"),
    (dict(num_layers=2, teacher_layers=[0, 4]), "teacher_layers must list num_layers=2 indices"),
    (dict(num_layers=2, teacher_layers=[0]), "teacher_layers must list num_layers=2 indices"),
    (dict(num_layers=2, teacher_layers=[0, "a"]), "teacher_layers must list integers"),
    (dict(num_layers=2, embed_dim=64), "embed_dim: the student's 64 exceeds the teacher's 32"),
    (dict(num_layers=2, num_heads=8), "num_heads: the student's 8 exceeds the teacher's 4"),
    (dict(num_layers=2, num_heads=3), "num_heads: 3 does not divide the student's embed_dim 32"),
    (dict(num_layers=2, embed_dim=24, num_heads=3, num_kv_heads=2),
     "num_kv_heads: 2 must divide num_heads 3"),
    (dict(num_layers=2, mlp_init="random"), "mlp_init must be one of"),
    (dict(num_layers=2, mlp_init="copy", intermediate_dim=64),
     "intermediate_dim: 64 exceeds the teacher's 48"),
    (dict(num_layers=2, head_dim=4), "head_dim: 4 is not supported"),
]


@pytest.mark.parametrize("kwargs,message", INVALID_STUDENTS)
def test_invalid_student_sizes_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        pruned_student(teacher=teacher_node("qwen2"), **kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_layers=5), "student_model.num_layers: 5 exceeds the teacher's 4 layers"),
    (dict(num_layers=2, teacher_layers=[0, 4]), "student_model.teacher_layers: must list "),
    (dict(num_layers=2, num_heads=3), "student_model.num_heads: 3 does not divide"),
    (dict(num_layers=2, num_layer=2), "student_model.num_layer: not an argument of "
                                      "tad_torchtune.models.pruned_student; accepted: teacher, "),
    (dict(num_layers=2, teacher=dict(teacher_node("qwen2"), scale_factor=8)),
     "student_model.teacher.scale_factor: not an argument of "
     "torchtune.models.qwen2._component_builders.qwen2; accepted: vocab_size, "),
    (dict(num_layers=2, teacher={"_component_": "torch.nn.Linear"}),
     "student_model.teacher._component_: 'torch.nn.Linear' is neither a registered family's "),
])
def test_a_config_names_the_student_models_key(kwargs, message):
    """Built from a config (``build_model``, as the recipes do), the error is one line naming
    the dotted key, an argument of the teacher's node included."""
    from tad_torchtune.errors import ConfigError
    from tad_torchtune.models import build_model

    node = {"_component_": "tad_torchtune.models.pruned_student",
            "teacher": teacher_node("qwen2"), **kwargs}
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        build_model(node, key="student_model")


def test_unknown_teacher_component_is_refused():
    with pytest.raises(ValueError, match="register_family"):
        pruned_student(teacher={"_component_": "torch.nn.Linear"}, num_layers=1)
    with pytest.raises(ValueError, match="_component_"):
        pruned_student(teacher={"vocab_size": 3}, num_layers=1)


def test_init_from_teacher_state_dict_equals_init_from_module():
    teacher = build_teacher("llama3_2")
    torch.manual_seed(3)
    a = pruned_student(teacher=teacher_node("llama3_2"), num_layers=2, intermediate_dim=24)
    torch.manual_seed(3)
    b = pruned_student(teacher=teacher_node("llama3_2"), num_layers=2, intermediate_dim=24)
    init_student_from_teacher(a, teacher)
    init_student_from_teacher(b, {k: v.clone() for k, v in teacher.state_dict().items()})
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k


def test_init_rejects_a_plain_model_and_a_wrong_teacher():
    teacher = build_teacher("qwen2")
    with pytest.raises(ValueError, match="distill_spec"):
        init_student_from_teacher(teacher, teacher)
    student = pruned_student(teacher=teacher_node("qwen2"), num_layers=2)
    with pytest.raises(ValueError, match="cannot be cut"):
        init_student_from_teacher(student, build_teacher("gemma2"))  # same keys, other shapes
    with pytest.raises(ValueError, match="teacher has no weight"):
        init_student_from_teacher(student, {"tok_embeddings.weight": torch.zeros(VOCAB, 32)})


@pytest.mark.parametrize("teacher_case,tie", [("qwen2", True), ("qwen2_5_tied", False)])
def test_student_can_change_embedding_tying(teacher_case, tie):
    teacher, student = _student(teacher_case, tie_word_embeddings=tie)
    assert isinstance(student.output, TiedLinear) == tie
    assert torch.equal(student.tok_embeddings.weight, teacher.tok_embeddings.weight)
    if not tie:  # output projection starts from the tied teacher's embeddings, and is frozen
        assert torch.equal(student.output.weight, teacher.tok_embeddings.weight)
        assert not student.output.weight.requires_grad
    with pytest.raises(ValueError, match="^tie_word_embeddings: True is not supported"):
        pruned_student(teacher=teacher_node("mistral"), num_layers=1, tie_word_embeddings=True)


def _flex_dispatch(model):
    """``model``'s MultiHeadAttentions dispatch a BlockMask to flex attention, as torchtune's
    ``_sdpa_or_flex_attention`` does on CUDA (on a CPU it has only the SDPA branch), through a
    function torch.compile does not trace, as its ``compile_friendly_flex_attention``; eager flex
    attention, torch's reference implementation."""
    import warnings

    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    from torchtune.modules import MultiHeadAttention

    @torch.compiler.disable(recursive=False)
    def friendly_flex_attention(q, k, v, block_mask):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return flex_attention(q, k, v, block_mask=block_mask)

    def attention_call(q, k, v, mask, dropout_p, is_causal):
        if not isinstance(mask, BlockMask):  # torchtune's SDPA branch
            mask = None if mask is None else mask[:, None, :, :]
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        calls.append(q.shape)
        return friendly_flex_attention(q, k, v, block_mask=mask)

    calls = []

    for m in model.modules():
        if isinstance(m, MultiHeadAttention):
            m._attention_call = attention_call
    return calls


@pytest.mark.parametrize("case,flex", [("llama3", False), ("qwen2", False), ("gemma2", False),
                                       ("phi3", False), ("phi2", False), ("qwen2", True),
                                       ("phi3", True), ("phi2", True)])
def test_document_attention_runs_each_document_as_if_alone(case, flex):
    """document_mask: a row packed with three documents gives, on each document, the logits of
    that document run on its own (positions restarting, no attention across the boundary), with
    the dense mask and with flex attention's BlockMask (the CUDA path of the families whose
    attention is torchtune's MultiHeadAttention)."""
    from tad_torchtune.data import document_attention

    model = build_teacher(case)
    flex_calls = _flex_dispatch(model) if flex else []
    lengths = [7, 5, 8]  # 20 tokens: past the tiny Gemma2's sliding window of 8
    docs = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0)
    tokens = torch.randint(0, VOCAB, (1, sum(lengths)), generator=torch.Generator().manual_seed(4))
    mask, input_pos = document_attention(docs, flex=flex)
    assert input_pos.tolist() == [list(range(7)) + list(range(5)) + list(range(8))]
    with torch.no_grad():
        packed = project_logits(model, forward_hidden(model, tokens, mask=mask,
                                                      input_pos=input_pos)[0])
        start = 0
        for n in lengths:
            alone = project_logits(model, forward_hidden(model, tokens[:, start : start + n])[0])
            torch.testing.assert_close(packed[:, start : start + n], alone, atol=1e-5, rtol=1e-5)
            start += n
        # without the mask the later documents see the earlier ones
        plain = project_logits(model, forward_hidden(model, tokens)[0])
        assert (plain[:, 7:12] - packed[:, 7:12]).abs().max() > 1e-3
    assert len(flex_calls) == (len(model.layers) if flex else 0)  # the BlockMask reached them all


def test_compiled_blocks_take_every_batch_s_block_mask_without_recompiling():
    """compile: true with flex document masks (the CUDA path, its dispatch emulated): every
    batch brings a new BlockMask of other documents, and the compiled blocks compile once."""
    from torch._dynamo.utils import counters

    from tad_torchtune.data import document_attention

    model = build_teacher("qwen2")
    flex_calls = _flex_dispatch(model)
    for layer in model.layers:
        layer.compile(backend="eager")
    torch._dynamo.reset()
    counters.clear()
    gen = torch.Generator().manual_seed(0)
    graphs = []
    with torch.no_grad():
        for _ in range(5):
            cuts = torch.randint(1, SEQ, (2,), generator=gen).sort().values.tolist()
            docs = (torch.arange(SEQ)[None] >= torch.tensor(cuts)[:, None]).sum(0)
            mask, input_pos = document_attention(docs.expand(2, -1), flex=True)
            tokens = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
            forward_hidden(model, tokens, mask=mask, input_pos=input_pos)
            graphs.append(counters["stats"]["unique_graphs"])
    assert len(flex_calls) == 5 * len(model.layers)
    assert graphs[0] >= 1 and graphs == [graphs[0]] * 5, graphs


@pytest.mark.parametrize("case", CASES)
def test_flex_attention_where_torchtune_runs_it_for_every_model(case, monkeypatch):
    """supports_flex_attention: CUDA with torchtune's flex dispatch, and no model with an
    attention other than MultiHeadAttention (Gemma2's refuses a BlockMask)."""
    import torchtune.utils._import_guard as guard

    from tad_torchtune.models import supports_flex_attention

    model, qwen2 = build_teacher(case), build_teacher("qwen2")
    monkeypatch.setattr(guard, "_SUPPORTS_FLEX_ATTENTION", True)
    assert supports_flex_attention("cuda", model) == (case != "gemma2")
    assert supports_flex_attention(torch.device("cuda", 1), qwen2, model) == (case != "gemma2")
    assert not supports_flex_attention("cpu", model)
    monkeypatch.setattr(guard, "_SUPPORTS_FLEX_ATTENTION", False)  # an older GPU
    assert not supports_flex_attention("cuda", model)
