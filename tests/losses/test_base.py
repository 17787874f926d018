"""The divergence contract (``losses/base.py``), held by EVERY registered divergence (a new one is
tested here without editing this file): gradcheck, ignored positions (all ignored, garbage that
must not leak), extreme logits, vocabulary entries masked in both models, a one-hot teacher,
zero when the student is the teacher, shape and vocabulary errors, the temperature argument and
torch.compile."""

import pytest
import torch

from tad_torchtune.losses import (
    DIVERGENCES,
    Divergence,
    DRKLLoss,
    ForwardKLLoss,
    ReverseKLLoss,
    TADLoss,
)
from tests.helpers.losses import (
    IGNORE,
    B,
    T,
    V,
    chunked,
    finite_loss_and_grad,
    loss_and_grad,
    make_inputs,
)

# Every registered divergence, with the arguments these small shapes need where its defaults
# would not do, walked in chunks of 4 tokens.
_SMALL = {"tad": {"k": 3, "beta": 2.0}, "drkl": {"gamma": 1.5}}
ALL_DIVERGENCES = {
    name: (lambda cls=cls, kw=_SMALL.get(name, {}): chunked(cls(**kw), 4))
    for name, cls in DIVERGENCES.items()
}


@pytest.mark.parametrize("name", sorted(ALL_DIVERGENCES))
def test_gradcheck(name):
    loss_fn = ALL_DIVERGENCES[name]()
    student, teacher, labels = make_inputs(6, torch.float64, b=2, t=5, v=11)
    labels[0, 1] = labels[1, 4] = IGNORE
    s = student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, teacher, labels), (s,))


# ----------------------------------------------------------------------------- masking


@pytest.mark.parametrize("name", sorted(ALL_DIVERGENCES))
def test_all_ignored_gives_zero_and_zero_grad(name):
    student, teacher, labels = make_inputs(7, torch.float32)
    labels = torch.full_like(labels, IGNORE)
    value, grad = loss_and_grad(ALL_DIVERGENCES[name](), student, teacher, labels)
    assert value.item() == 0.0
    assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("name", sorted(ALL_DIVERGENCES))
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), float("-inf"), 1e4])
def test_ignored_positions_cannot_leak(name, garbage):
    student, teacher, labels = make_inputs(8, torch.float32)
    loss_fn = ALL_DIVERGENCES[name]()
    v0, g0 = loss_and_grad(loss_fn, student, teacher, labels)
    ignored = labels == IGNORE
    s2, t2 = student.clone(), teacher.clone()
    s2[ignored] = garbage
    t2[ignored] = -garbage if garbage == garbage else garbage
    v1, g1 = loss_and_grad(loss_fn, s2, t2, labels)
    assert torch.equal(v0, v1)
    assert torch.equal(g0, g1)
    assert torch.count_nonzero(g1[ignored]) == 0


# ----------------------------------------------------------------------------- extremes


@pytest.mark.parametrize("name", sorted(ALL_DIVERGENCES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_logits_stay_finite(name, dtype):
    student, teacher, labels = make_inputs(9, torch.float32)
    s = (student * 1e4 / student.abs().amax()).to(dtype)
    t = (teacher * 1e4 / teacher.abs().amax()).to(dtype)
    finite_loss_and_grad(ALL_DIVERGENCES[name](), s, t, labels)


@pytest.mark.parametrize("name", sorted(ALL_DIVERGENCES))
def test_masked_vocabulary_entries(name):
    """-inf in both models at the same ids: probability 0, contributes 0 (same value as dropping
    those ids)."""
    student, teacher, labels = make_inputs(10, torch.float64)
    labels = torch.where(labels == IGNORE, labels, labels % 100)  # labels never masked ids
    s, t = student.clone(), teacher.clone()
    s[..., 100:] = float("-inf")
    t[..., 100:] = float("-inf")
    value, grad = finite_loss_and_grad(ALL_DIVERGENCES[name](), s, t, labels)
    expected, expected_grad = loss_and_grad(
        ALL_DIVERGENCES[name](), student[..., :100], teacher[..., :100], labels
    )
    torch.testing.assert_close(value, expected, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grad[..., :100], expected_grad, atol=1e-12, rtol=1e-10)
    assert torch.count_nonzero(grad[..., 100:]) == 0


@pytest.mark.parametrize("name", sorted(ALL_DIVERGENCES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_hot_teacher(name, dtype):
    student, _, labels = make_inputs(11, torch.float32)
    teacher = torch.zeros(B, T, V)
    teacher.scatter_(-1, torch.randint(0, V, (B, T, 1)), 1e4)
    finite_loss_and_grad(ALL_DIVERGENCES[name](), student.to(dtype), teacher.to(dtype), labels)


@pytest.mark.parametrize(
    "loss_fn",
    [ForwardKLLoss(), ReverseKLLoss(), TADLoss(k=1), TADLoss(k=10, beta=5.0), DRKLLoss(gamma=2.0)],
    ids=["fkl", "rkl", "tad1", "tad10", "drkl"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_when_student_equals_teacher(loss_fn, dtype):
    _, teacher, labels = make_inputs(4, dtype)
    assert abs(float(loss_fn(teacher.clone(), teacher, labels))) < 1e-6
    shifted = (teacher.float() + 3.0).to(dtype)  # a constant shift changes no distribution
    assert abs(float(loss_fn(shifted, teacher, labels))) < 1e-6


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: ForwardKLLoss(temperature=0), "temperature must be a finite number > 0"),
        (lambda: ReverseKLLoss(temperature=-2.0), "temperature must be a finite number > 0"),
    ],
)
def test_bad_temperature(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("name", sorted(ALL_DIVERGENCES))
def test_mismatched_shapes_raise(name):
    student, teacher, labels = make_inputs(15, torch.float32)
    loss_fn = ALL_DIVERGENCES[name]()
    with pytest.raises(ValueError, match="teacher_logits shape"):
        loss_fn(student, teacher[:, :-1], labels)
    with pytest.raises(ValueError, match="labels shape"):
        loss_fn(student, teacher, labels[:, :-1])


@pytest.mark.parametrize("name", sorted(ALL_DIVERGENCES))
def test_vocab_mismatch_without_alignment_raises(name):
    student, teacher, labels = make_inputs(16, torch.float32)
    with pytest.raises(ValueError, match=r"teacher_logits shape \(3, 47, 123\) does not match "
                                         r"student_logits shape \(3, 47, 100\).*align_teacher_vocab"):
        ALL_DIVERGENCES[name]()(student[..., :100], teacher, labels % 100)


# ----------------------------------------------------------------------------- compile


# torch.compile traces the whole chunk loop into one graph, each chunk unrolled: the 141 tokens
# go in chunks of 64 (64, 64 and a shorter 13), not of 4 (36 chunks: 15 s of tracing each, and
# 5 to 8 minutes of inductor's cold C++ compile on a 2-core CPU). Inductor, whose generated code
# costs ~30 s per graph cold, compiles TAD (the core loss) on one chunk; the chunk loop under
# inductor is the recipe's (``tests/recipes/test_tad_distill.py``, ``compile: true``) and the
# fused head's (``tests/losses/test_fused.py``, ``compile_chunks``). The others go through
# dynamo + AOT autograd (the same tracing, without code generation).
@pytest.mark.parametrize(
    "name,backend,chunk_size",
    [pytest.param("tad", "inductor", None, marks=pytest.mark.slow), ("tad", "aot_eager", 64),
     ("forward_kl", "aot_eager", 64), ("reverse_kl", "aot_eager", 64), ("drkl", "aot_eager", 64)],
)
def test_compile_matches_eager(name, backend, chunk_size):
    torch._dynamo.reset()
    student, teacher, labels = make_inputs(20, torch.float32)
    loss_fn = chunked(DIVERGENCES[name](**_SMALL.get(name, {})), chunk_size)
    eager_v, eager_g = loss_and_grad(loss_fn, student, teacher, labels)
    compiled = torch.compile(loss_fn, backend=backend)
    v, g = loss_and_grad(compiled, student, teacher, labels)
    torch.testing.assert_close(v, eager_v, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g, eager_g, atol=1e-8, rtol=1e-5)


def test_a_divergence_without_its_chunk_math_is_refused_at_set_up():
    """A user's subclass that forgot ``chunk_fn`` died at the first step with 'NoneType object
    is not callable'; ``validate`` (run at set-up) names it."""
    from tad_torchtune.errors import ConfigError
    from tad_torchtune.losses import Divergence, DivergenceUse

    class Unfinished(Divergence):
        pass

    with pytest.raises(ConfigError) as err:
        Unfinished().validate(DivergenceUse(vocab_size=10))
    assert str(err.value) == (
        f"kd_loss._component_: {__name__}.Unfinished sets no chunk_fn; accepted: a Divergence "
        f"subclass that sets chunk_fn (docs/design.md, 'The divergence contract')")
    for cls in DIVERGENCES.values():  # the shipped ones all set it
        cls().validate(DivergenceUse(vocab_size=100))


def _mse(s, t, labels):  # a common distillation loss that is not a divergence of distributions
    return ((s - t) ** 2).mean(-1), {}


class _Scalar(ForwardKLLoss):  # one value for the whole chunk
    chunk_fn = staticmethod(lambda s, t, labels: (((s - t) ** 2).mean(), {}))


class _Undeclared(ForwardKLLoss):  # a diagnostic its stat_names do not name
    chunk_fn = staticmethod(lambda s, t, labels: ((s - t).pow(2).mean(-1), {"gap": s[:, 0]}))


class _Unreturned(ForwardKLLoss):  # a declared diagnostic never returned
    stat_names = ("gap",)
    chunk_fn = staticmethod(_mse)


class _NotStatic(ForwardKLLoss):  # chunk_fn = fn, without staticmethod: a bound method
    chunk_fn = _mse


class _ReadsLabels(ForwardKLLoss):  # reads the label without reads_labels = True
    chunk_fn = staticmethod(
        lambda s, t, labels: (-s.log_softmax(-1).gather(-1, labels[:, None])[:, 0], {}))


class _LogitMSE(ForwardKLLoss):
    chunk_fn = staticmethod(_mse)


class _Noisy(ForwardKLLoss):  # a value that draws at random (neither labels nor a shift read)
    chunk_fn = staticmethod(lambda s, t, labels: (((s - t) ** 2).mean(-1) * torch.rand(()), {}))


class _TailStat(ForwardKLLoss):  # D_KL1 + w D_KL2 (forward KL's), with a diagnostic of its own
    stat_names = ("top1",)

    @staticmethod
    def chunk_fn(s, t, labels):
        from tad_torchtune.losses.kl import forward_kl_chunk

        value, _ = forward_kl_chunk(s, t, labels)
        return value, {"top1": t.softmax(-1).amax(-1)}


def test_the_contract_is_checked_at_set_up_on_random_logits():
    """What a divergence written outside this package can get wrong is one line at set-up
    (``check``): before, a traceback at the first step (an AssertionError, a KeyError, a
    TypeError), or silently wrong numbers (a scalar per chunk counted n times; the label read
    from a cache, which has none; logits compared where a bucket cache holds log-probabilities)."""
    from tad_torchtune.errors import ConfigError
    from tad_torchtune.losses import CacheSpec, DivergenceUse

    online = DivergenceUse(vocab_size=100)
    bucket = DivergenceUse(vocab_size=100, cache=CacheSpec("top_m", 8, 1.0, "teacher_cache_dir='c'"))
    sampled = DivergenceUse(vocab_size=100, cache=CacheSpec("sampled", 8, 1.0, "teacher_cache_dir='c'"))
    contract = "(docs/design.md, 'The divergence contract')"

    def refused(cls, use):
        with pytest.raises(ConfigError) as err:
            cls().check(use)
        return str(err.value)

    head = "kd_loss._component_: tests.losses.test_base."
    assert refused(_Scalar, online) == (
        f"{head}_Scalar breaks the divergence contract on a chunk of random logits: chunk_fn "
        f"returned a per-token value of shape () for a chunk of 5 rows; accepted: one value per "
        f"row {contract}")
    assert refused(_Undeclared, online) == (
        f"{head}_Undeclared breaks the divergence contract on a chunk of random logits: chunk_fn "
        f"returned the diagnostics ['gap'] where its stat_names declare []; accepted: exactly the "
        f"declared ones {contract}")
    assert "chunk_fn returned the diagnostics [] where its stat_names declare ['gap']" in (
        refused(_Unreturned, online))
    assert refused(_NotStatic, online).startswith(
        f"{head}_NotStatic breaks the divergence contract on a chunk of random logits: ")
    assert refused(_ReadsLabels, online) == (
        f"{head}_ReadsLabels's value changes with the labels, but it does not set reads_labels "
        f"= True (a teacher cache would give it no label: a wrong value, silently); accepted: a "
        f"divergence that declares what it reads {contract}")
    _LogitMSE().check(online)  # the live teacher: its logits, any loss of them
    assert refused(_LogitMSE, bucket) == (
        f"{head}_LogitMSE's value changes when a constant is added to a position's teacher "
        f"logits, and a bucket teacher cache (teacher_cache_dir='c') holds log-probabilities; "
        f"accepted: a divergence of the two distributions, or the live teacher")
    _TailStat().check(bucket)
    _Noisy().check(bucket)  # random: not compared with itself, nor refused for it
    assert refused(_TailStat, sampled) == (
        f"{head}_TailStat's diagnostics ['top1'] cannot be computed from a sampled teacher cache "
        f"(teacher_cache_dir='c'), which serves ['dkl1', 'dkl2', 'tail_mass']; accepted: a cache "
        f"made with cache_mode=top_m, or the live teacher")
    for name, cls in DIVERGENCES.items():  # every shipped one keeps it, wherever it serves
        for use in (online, bucket, sampled):
            if use is not sampled or cls.tail_weight is not Divergence.tail_weight:
                cls(**_SMALL.get(name, {})).check(use)


def test_the_contract_is_checked_on_the_host_under_any_default_device():
    """``check`` runs its probe on CPU tensors whatever default device the caller set:
    recipe_bench sets a recipe up under ``torch.device("cuda")``, where the probe's CPU
    generator filled CUDA tensors and CUDA refused it, so the GPU check's recipe steps failed at
    set-up (here the meta device stands for it: a probe on it has no values to compare)."""
    from tad_torchtune.losses import CacheSpec, DivergenceUse

    sampled = CacheSpec("sampled", 8, 1.0, "teacher_cache_dir='c'")
    for name, cls in DIVERGENCES.items():
        for use in (DivergenceUse(vocab_size=100, fused=True), DivergenceUse(vocab_size=100,
                                                                             cache=sampled)):
            if use.cache is None or cls.tail_weight is not Divergence.tail_weight:
                with torch.device("meta"):
                    cls(**_SMALL.get(name, {})).check(use)


def test_a_divergence_name_is_one_class_s():
    """A user's class named as a shipped divergence replaced it in the registry, silently."""
    with pytest.raises(ValueError) as err:
        class Clash(ForwardKLLoss):
            name = "forward_kl"

    assert str(err.value) == (
        f"{__name__}.test_a_divergence_name_is_one_class_s.<locals>.Clash: the divergence name "
        f"'forward_kl' is tad_torchtune.losses.kl.ForwardKLLoss's; accepted: a name of its own")
    assert DIVERGENCES["forward_kl"] is ForwardKLLoss
