"""One step's terms (``head.py``) on tiny models: ``TeacherHead`` aligns a larger teacher's
logits, output weight and bias to the student's vocabulary (and refuses otherwise, naming both
sizes); ``StudentHead.forward`` gives the objective, CE, KD and TAD's diagnostics of a
hand-computed float64 CE + TAD on the models' own logits, with its gradient, unfused and fused,
from the live teacher and from a teacher cache; ``evaluate`` is ``StudentMetrics.update`` on
the logits."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torchtune.config._utils import _get_component_from_path

from tad_torchtune.data import collate
from tad_torchtune.head import StudentHead, TeacherHead
from tad_torchtune.losses import TADLoss
from tad_torchtune.losses.cached import teacher_top_m
from tad_torchtune.metrics import StudentMetrics
from tests.helpers.teachers import SEQ, VOCAB, build_teacher, randomize_, teacher_node
from tests.losses import reference as ref

IGNORE = -100
V_T = VOCAB + 7  # a teacher with padded embedding rows past the student's vocabulary
K, BETA = 5, 2.0
CLM_W, KD_W = 0.7, 1.3


@pytest.fixture(scope="module")
def models():
    """A Phi-2-family teacher (its output projection has a bias) over ``V_T`` ids, and a
    llama3-family student over the first ``VOCAB`` of them."""
    node = dict(teacher_node("phi2"), vocab_size=V_T)
    teacher = randomize_(_get_component_from_path(node.pop("_component_"))(**node), seed=7)
    student = build_teacher("llama3", seed=1)
    return teacher.eval(), student


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(3):
        tokens = torch.randint(0, VOCAB, (SEQ,), generator=gen)
        labels = tokens.clone()
        labels[:4] = IGNORE  # a prompt that does not count
        rows.append({"tokens": tokens, "labels": labels})
    return collate(rows)


def _logits(model, tokens):
    """torchtune's own forward (not the package's), float64."""
    with torch.no_grad():
        return model(tokens).double()


def test_teacher_head_aligns_a_larger_teacher_and_refuses_otherwise(models, batch):
    teacher, _ = models
    out = TeacherHead(teacher, vocab_size=VOCAB, vocab_alignment="truncate_teacher",
                      hidden_layers=(1,))(batch, logits=True)
    full = _logits(teacher, batch.tokens)
    assert full.shape[-1] == V_T and out.logits.shape[-1] == VOCAB
    torch.testing.assert_close(out.logits.double(), full[..., :VOCAB], atol=1e-5, rtol=1e-5)
    assert torch.equal(out.weight, teacher.output.weight[:VOCAB])
    assert torch.equal(out.bias, teacher.output.bias[:VOCAB])
    # the hidden state and weight give the aligned logits (the fused path projects them)
    torch.testing.assert_close(out.hidden @ out.weight.T + out.bias, out.logits, atol=1e-5,
                               rtol=1e-5)
    assert len(out.layers) == 1 and out.layers[0].shape == (*batch.tokens.shape, 32)
    assert TeacherHead(teacher, vocab_size=VOCAB, vocab_alignment="truncate_teacher")(
        batch, logits=False).logits is None

    with pytest.raises(ValueError) as err:
        TeacherHead(teacher, vocab_size=VOCAB)(batch, logits=True)
    assert f"teacher has {V_T} logits, student has {VOCAB} (vocab_alignment='exact')" in \
        str(err.value)
    with pytest.raises(ValueError, match=f"teacher has {V_T} logits, student has {V_T + 1}.*"
                                         "smaller than the student's"):
        TeacherHead(teacher, vocab_size=V_T + 1, vocab_alignment="truncate_teacher")(
            batch, logits=False)
    with pytest.raises(ValueError, match="vocab_alignment must be one of"):
        TeacherHead(teacher, vocab_size=VOCAB, vocab_alignment="pad")


def _reference(student, teacher, batch, z_t=None):
    """The objective, CE, TAD and its diagnostics (sums over valid positions), in float64 from
    the models' logits (the teacher's: ``z_t`` when given) and the naive references, and the
    objective's gradient w.r.t. the student's parameters."""
    s_model = copy.deepcopy(student).double()
    z_s = s_model(batch.tokens)  # (B, T, V) float64, differentiable
    z_t = _logits(teacher, batch.tokens)[..., :VOCAB] if z_t is None else z_t
    labels = batch.labels
    n = int((labels != IGNORE).sum())
    ce = F.cross_entropy(z_s.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=IGNORE,
                         reduction="sum")
    kd = ref.tad(z_s, z_t, labels, K, BETA) * n
    objective = CLM_W * ce + KD_W * kd
    objective.backward()
    grads = {k: p.grad.float() for k, p in s_model.named_parameters() if p.grad is not None}
    p, q = torch.softmax(z_t, -1), torch.softmax(z_s.detach(), -1)
    valid = (labels != IGNORE).nonzero().tolist()
    parts = {(b, i): ref.tad_token_parts(p[b, i], q[b, i], K) for b, i in valid}
    abar = {b: sum(float(parts[r, i]["alpha_t"]) for r, i in valid if r == b)
            / sum(1 for r, _ in valid if r == b) for b in range(labels.shape[0])}
    stats = {"dkl1": sum(float(x["dkl1"]) for x in parts.values()),
             "dkl2": sum(float(x["dkl2"]) for x in parts.values()),
             "tail_mass": sum(float(x["alpha_t"]) for x in parts.values()),
             "abar": sum(abar[b] for b, _ in valid)}
    return {"objective": float(objective), "ce": float(ce), "kd": float(kd), "n": n,
            "stats": stats, "grads": grads}


@pytest.fixture(scope="module")
def expected(models, batch):
    teacher, student = models
    return _reference(student, teacher, batch)


# torchtune's RMSNorm computes in float32 even in a float64 model: said once, not per call
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("from_cache", [False, True])
def test_student_head_forward_is_ce_plus_the_divergence(models, batch, expected, fused,
                                                        from_cache):
    teacher, student = models
    head = StudentHead(copy.deepcopy(student), kd_loss=TADLoss(k=K, beta=BETA),
                       clm_weight=CLM_W, kd_weight=KD_W, fused=fused, chunk_size=16,
                       from_cache=from_cache)
    assert head.needs_teacher is not from_cache
    assert head.needs_teacher_logits is (not fused and not from_cache)
    if from_cache:
        # the bucket holds one id (M = V - 1) and float32 entries: the cached loss is exact
        z_t = _logits(teacher, batch.tokens)[..., :VOCAB].float()
        batch = copy.copy(batch)
        batch.teacher = teacher_top_m(z_t, batch.labels, VOCAB - 1)
        out = None
    else:
        out = TeacherHead(teacher, vocab_size=VOCAB, vocab_alignment="truncate_teacher")(
            batch, logits=head.needs_teacher_logits)
    terms = head(batch, out)
    # FSDP2 (torch 2.11) re-gathers the root's weights for backward from hooks on the tensors
    # pytree finds in the root's output: the objective must be one of them
    assert any(leaf is terms.objective for leaf in pytree.tree_leaves(terms))
    terms.objective.backward()
    assert int(terms.num_tokens) == expected["n"] == batch.num_tokens
    assert terms.objective.dtype == torch.float32
    assert float(terms.objective) == pytest.approx(expected["objective"], rel=1e-5)
    assert float(terms.ce) == pytest.approx(expected["ce"], rel=1e-5)
    assert float(terms.kd) == pytest.approx(expected["kd"], rel=1e-5)
    assert terms.hidden is None
    assert sorted(terms.stats) == sorted(expected["stats"])
    for name, value in expected["stats"].items():
        assert float(terms.stats[name]) == pytest.approx(value, rel=1e-4), name
    grads = {k: p.grad for k, p in head.student.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(expected["grads"])
    for name, want in expected["grads"].items():
        torch.testing.assert_close(grads[name], want, atol=1e-5 * float(want.abs().max()),
                                   rtol=1e-3)


@pytest.mark.parametrize("fused", [False, True])
def test_evaluate_is_student_metrics_on_the_logits(models, batch, fused):
    teacher, student = models
    head = StudentHead(student, kd_loss=TADLoss(k=K), fused=fused, chunk_size=16)
    out = TeacherHead(teacher, vocab_size=VOCAB, vocab_alignment="truncate_teacher")(
        batch, logits=not fused)  # the fused path evaluates from hidden states
    got = head.new_metrics(num_bins=10)
    head.evaluate(batch, out, got)
    want = StudentMetrics(num_bins=10)
    want.update(_logits(student, batch.tokens).float(),
                _logits(teacher, batch.tokens)[..., :VOCAB].float(), batch.labels)
    got, want = got.compute(), want.compute()
    assert got["num_tokens"] == want["num_tokens"] == batch.num_tokens
    for key in ("kl", "ce", "ppl", "full_ece", "top1_agreement", "top1_accuracy"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    assert want["kl"] > 0.1  # two different models: the comparison is not of zeros


#: teacher ids past the student's vocabulary merged into student ids (``teacher_id_merges``)
MERGES = {VOCAB + 1: 3, VOCAB + 4: 3, VOCAB: 0}


@pytest.fixture(scope="module")
def merging(models, batch):
    """A teacher whose merged ids hold much of its mass (their output biases raised), and the
    float64 reference of CE + TAD against its probabilities with each source's added to its
    target's, computed from the full softmax; the reference without the merges differs."""
    from tad_torchtune.vocab import check_teacher_id_merges

    teacher, student = models
    teacher = copy.deepcopy(teacher)
    with torch.no_grad():
        teacher.output.bias[list(MERGES)] += 4.0
    p = torch.softmax(_logits(teacher, batch.tokens), -1)
    merged = p[..., :VOCAB].clone()
    for source, target in MERGES.items():
        merged[..., target] += p[..., source]
    want = _reference(student, teacher, batch, z_t=merged.log())
    cut = _reference(student, teacher, batch)
    assert abs(want["kd"] - cut["kd"]) > 0.05 * cut["kd"]  # the merges matter here
    ids = check_teacher_id_merges(MERGES, teacher_vocab_size=V_T, student_vocab_size=VOCAB,
                                  vocab_alignment="truncate_teacher")
    return teacher, ids, merged, want


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("from_cache", [False, True])
def test_merged_teacher_ids_reach_every_path_as_added_probabilities(models, batch, merging,
                                                                    fused, from_cache):
    """``teacher_id_merges`` through ``TeacherHead``: the logits (the unfused path, and a
    cache made from them, as ``tad_cache`` makes it) and the rows the fused head folds into
    each chunk give CE + TAD against the merged probabilities: objective, TAD and gradients."""
    _, student = models
    teacher, ids, _, want = merging
    head = StudentHead(copy.deepcopy(student), kd_loss=TADLoss(k=K, beta=BETA),
                       clm_weight=CLM_W, kd_weight=KD_W, fused=fused, chunk_size=16,
                       from_cache=from_cache)
    teacher_head = TeacherHead(teacher, vocab_size=VOCAB, vocab_alignment="truncate_teacher",
                               merges=ids)
    if from_cache:
        z_t = teacher_head(batch, logits=True).logits.float()
        batch = copy.copy(batch)
        batch.teacher = teacher_top_m(z_t, batch.labels, VOCAB - 1)
        out = None
    else:
        out = teacher_head(batch, logits=head.needs_teacher_logits)
        assert (out.logits is None) is fused
    terms = head(batch, out)
    terms.objective.backward()
    assert float(terms.objective) == pytest.approx(want["objective"], rel=1e-5)
    assert float(terms.kd) == pytest.approx(want["kd"], rel=1e-5)
    grads = {k: p.grad for k, p in head.student.named_parameters() if p.grad is not None}
    for name, g in want["grads"].items():
        torch.testing.assert_close(grads[name], g, atol=1e-5 * float(g.abs().max()), rtol=1e-3)


@pytest.mark.parametrize("fused", [False, True])
def test_evaluate_reads_the_merged_teacher(models, batch, merging, fused):
    _, student = models
    teacher, ids, merged, _ = merging
    head = StudentHead(student, kd_loss=TADLoss(k=K), fused=fused, chunk_size=16)
    out = TeacherHead(teacher, vocab_size=VOCAB, vocab_alignment="truncate_teacher",
                      merges=ids)(batch, logits=not fused)
    got = head.new_metrics(num_bins=10)
    head.evaluate(batch, out, got)
    want = StudentMetrics(num_bins=10)
    want.update(_logits(student, batch.tokens).float(), merged.log().float(), batch.labels)
    got, want = got.compute(), want.compute()
    for key in ("kl", "ce", "top1_agreement"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key


def test_merges_are_refused_with_a_soft_capping_teacher(batch):
    from tad_torchtune.vocab import IdMerges

    gemma = build_teacher("gemma2", seed=0)
    with pytest.raises(ValueError, match=r"^teacher_id_merges: \{60: 1\} with a teacher that "
                                         r"soft-caps its logits \(\d+(\.\d+)?\); accepted: a "
                                         r"teacher without a logit soft-cap$"):
        TeacherHead(gemma, vocab_size=VOCAB, merges=IdMerges((60,), (1,)))


def test_merged_bf16_metrics_are_the_same_from_hidden_states_and_from_logits(models, batch,
                                                                          merging):
    """In bf16 the merged target logit is rounded to bf16 on every path: the fused
    evaluation (from hidden states) gives the unfused one's figures."""
    _, student = models
    teacher, ids, _, _ = merging
    teacher, student = copy.deepcopy(teacher).bfloat16(), copy.deepcopy(student).bfloat16()
    figures = []
    for fused in (False, True):
        head = StudentHead(student, kd_loss=TADLoss(k=K), fused=fused, chunk_size=16)
        out = TeacherHead(teacher, vocab_size=VOCAB, vocab_alignment="truncate_teacher",
                          merges=ids)(batch, logits=not fused)
        metrics = head.new_metrics(num_bins=10)
        head.evaluate(batch, out, metrics)
        figures.append(metrics.compute())
    for key in ("kl", "ce", "top1_agreement"):
        assert figures[1][key] == pytest.approx(figures[0][key], rel=1e-6, abs=1e-9), key
