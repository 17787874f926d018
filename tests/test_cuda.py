"""The CUDA path, on a GPU: the fused losses and the fused head equal the unfused ones in float32
and bf16 for every registered divergence, eager and (the head in bf16, and from each teacher
cache) through inductor, Liger-Kernel's fused linear JSD is our forward KL at the beta
``benchmarks/loss_bench.py`` compares it at, document masks run by flex attention equal the
dense ones, and a 2-step ``tune run tad_distill`` in bf16 with ``compile: true`` and ``fused:
true`` gives the losses of the eager run.

Every test here is marked ``cuda`` and skipped without a GPU, so CI (CPU) collects and skips them;
``benchmarks/gpu_check.sh`` runs them on a GPU (``pytest -m cuda tests/test_cuda.py``). Those
that need no GPU kernel of their own also run on the CPU, in CI (``tests/test_cuda_on_cpu.py``:
a new test here joins its list or its GPU-only list).

bf16 inputs: a cuBLAS product of a chunk and one of the whole batch may round a logit
differently (another kernel, another summation order), which would make fused and unfused differ
by bf16 roundings of the logits (and TAD's top-K by a tie broken otherwise), hiding an error of
that size. ``exact_bf16_case`` gives every token a one-hot hidden state scaled by a power of two,
so each logit is ONE product of bf16 numbers, exact in every kernel, summation order and in bf16,
and the teacher's weight columns distinct values, so its top-K has no ties. Both paths then see
the same logits bit for bit, and the bf16 tolerances of ``tests/losses/test_fused.py`` apply
unchanged: the loss within 1e-5 of float64 math on those logits, the bf16 gradients (full
products ``grad @ w`` and ``grad.T @ h`` over every chunk) within 1e-2 of the largest entry.
"""

import math
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.losses import DIVERGENCE_CASES as DIVERGENCES
from tests.helpers.losses import DIVERGENCES as REGISTERED
from tests.helpers.losses import (
    IGNORE,
    B,
    D,
    D_T,
    T,
    V,
    assert_head_equals,
    assert_same,
    bf16_reference,
    fused,
    head,
    make_case,
    unfused,
    unfused_head,
)
from tests.helpers import tune

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import loss_bench  # noqa: E402  (the benchmark's Liger case)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    """float32 means float32: no TF32 products (torch's default, asserted against a caller that
    changed it), so the float32 tolerances of the CPU tests hold."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved[0]
    torch.set_float32_matmul_precision(saved[1])


def on_cuda(case):
    return tuple(x.cuda() for x in case)


def exact_bf16_case(seed: int):
    """``make_case``'s shapes and masks in bf16 on the GPU, with logits that every kernel
    computes exactly (module docstring): hidden states ``scale * one_hot(column)``, scale in
    {1/2, 1, 2}; the student's weight any bf16 numbers; each teacher weight column a permutation
    of 123 distinct multiples of 1/16 in (-4, 4) (exact in bf16)."""
    _, _, _, _, labels = make_case(seed)
    gen = torch.Generator().manual_seed(seed)

    def one_hot(dim: int) -> torch.Tensor:  # (B, T, dim)
        columns = torch.randint(0, dim, (B, T), generator=gen)
        scale = 2.0 ** torch.randint(-1, 2, (B, T, 1), generator=gen)
        return F.one_hot(columns, dim) * scale

    h_s, h_t = one_hot(D), one_hot(D_T)
    w_s = torch.randn(V, D, generator=gen) * 1.5
    levels = (torch.arange(V) - V // 2) / 16.0
    w_t = torch.stack([levels[torch.randperm(V, generator=gen)] for _ in range(D_T)], dim=1)
    return on_cuda(tuple(x.bfloat16() for x in (h_s, w_s, h_t, w_t)) + (labels,))


def test_exact_bf16_case_has_exact_logits():
    """The premise of the bf16 tests: the GPU's bf16 logits, of the whole batch or of any chunk,
    equal the float64 products, and no teacher row has two equal logits."""
    h_s, w_s, h_t, w_t, _ = exact_bf16_case(6)
    for h, w in ((h_s, w_s), (h_t, w_t)):
        exact = h.double() @ w.double().T
        assert torch.equal((h @ w.T).double(), exact)
        assert torch.equal(torch.cat([c @ w.T for c in h.reshape(-1, h.shape[-1]).split(13)])
                           .double(), exact.reshape(-1, V))
    teacher = (h_t @ w_t.T).float().sort(dim=-1).values
    assert (teacher.diff(dim=-1) > 0).all()


# --------------------------------------- GPU-only, nothing compiled: first, so that a capped
# --------------------------------------- step (gpu_check.sh) keeps their results


@pytest.mark.parametrize("cpu_offload", [False, True])
def test_fsdp_loads_its_shards_on_the_gpu_or_the_host(cpu_offload, tmp_path, monkeypatch):
    """The sharded loading on the GPU, as the recipe's process group sets it up (NCCL; with
    ``fsdp_cpu_offload`` NCCL and gloo): with CPU offload every shard is a DTensor on the host
    (FSDP refuses one whose device is the GPU's at its first forward), without it on the GPU;
    the teacher's logits equal the unsharded model's; the student trains a step."""
    from tests.helpers.teachers import check_sharded_loading

    check_sharded_loading("cuda", "cuda:nccl,cpu:gloo" if cpu_offload else "nccl", cpu_offload,
                          tmp_path, monkeypatch)


def test_the_bf16_weight_gradient_accumulates_inside_the_matmul():
    """On a GPU the fused head sums a bf16 weight gradient into its float32 accumulator inside
    the matmul (``torch.addmm(..., out_dtype=torch.float32)``): available, and equal to the
    float32 sum of the bf16 products."""
    from tad_torchtune.losses.fused import _accumulate_weight_grad, _mixed_mm_ok

    assert _mixed_mm_ok(torch.device("cuda"), torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    grad = torch.randn(96, 1000, device="cuda", generator=g).to(torch.bfloat16)
    h = torch.randn(96, 64, device="cuda", generator=g).to(torch.bfloat16)
    acc = torch.randn(1000, 64, device="cuda", generator=g)
    want = acc + grad.t().float() @ h.float()
    _accumulate_weight_grad(acc, grad, h)
    torch.testing.assert_close(acc, want, atol=1e-4 * float(want.abs().max()), rtol=1e-4)


# ----------------------------------------------------------------------------- fused == unfused


@pytest.mark.parametrize("chunk_size", [13, None])  # 141 tokens: 13 never divides them
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_fused_equals_unfused_float32(name, chunk_size):
    div = DIVERGENCES[name]()
    case = on_cuda(make_case(0))
    assert_same(fused(div, *case, chunk_size=chunk_size), unfused(div, *case), torch.float32)


@pytest.mark.parametrize("chunk_size", [16, 1])  # 1: the weight gradient by vocabulary blocks
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_fused_equals_unfused_bf16(name, chunk_size):
    """bf16 hidden states and weights: the fused loss and diagnostics equal the unfused ones on
    the bf16 logits and float64 math on them; the bf16 gradients both paths return are within
    bf16 rounding of float64."""
    div = DIVERGENCES[name]()
    case = exact_bf16_case(6)
    out, g_h, g_w = fused(div, *case, chunk_size=chunk_size)
    ref, r_h, r_w = bf16_reference(div, *case)
    plain, u_h, u_w = unfused(div, *case)
    assert out.total.dtype == torch.float32 and g_h.dtype == g_w.dtype == torch.bfloat16
    torch.testing.assert_close(out.total.double(), ref.total, atol=0, rtol=1e-5)
    torch.testing.assert_close(out.total, plain.total, atol=0, rtol=1e-5)
    assert int(out.num_tokens) == int(plain.num_tokens)
    for k in plain.stats:
        torch.testing.assert_close(out.stats[k], plain.stats[k],
                                   atol=1e-5 * float(plain.stats[k].abs().max()), rtol=1e-5)
    for got, want in ((g_h, r_h), (g_w, r_w), (u_h, r_h), (u_w, r_w)):
        scale = float(want.abs().max())
        torch.testing.assert_close(got.double(), want, atol=1e-2 * scale, rtol=1e-2)


@pytest.mark.parametrize("name", sorted(DIVERGENCES) + ["ce_only"])
def test_fused_head_equals_unfused_float32(name):
    """The recipe's fused head (CE + divergence from one projection) against CE + divergence on
    materialised logits, weighted as in a recipe with clm_weight 0.7, kd_weight 1.3."""
    div = None if name == "ce_only" else DIVERGENCES[name]()
    case = on_cuda(make_case(31))
    ref_obj, ref_ce, ref_kd, ref_n, ref_gh, ref_gw = unfused_head(div, *case, 0.7, 1.3)
    out, gh, gw = head(div, *case, ce_weight=0.7, kd_weight=1.3, chunk_size=13, compute_ce=True)
    assert_head_equals(out, gh, gw, (ref_obj, ref_ce, ref_kd, ref_n, ref_gh, ref_gw),
                       torch.float32, stats=False)


def bf16_head_reference(div, h_s, w_s, h_t, w_t, labels, ce_weight, kd_weight):
    """float64 CE and divergence on the (exact) bf16 logits, chained to the hidden states and
    the weight in float64: ``(objective, ce, grad_h, grad_w)``."""
    z = (h_s @ w_s.T).double().requires_grad_(True)
    ce = F.cross_entropy(z.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE,
                         reduction="sum")
    objective = ce_weight * ce
    if div is not None:
        objective = objective + kd_weight * div.sum_and_count(z, (h_t @ w_t.T).double(),
                                                              labels).total
    (g_z,) = torch.autograd.grad(objective, z)
    return objective, ce, g_z @ w_s.double(), g_z.reshape(-1, V).T @ h_s.double().reshape(-1, D)


def assert_bf16_head_is_float64_math(div, case, **head_kwargs):
    """The fused head (CE 0.7 + divergence 1.3, chunks of 16, ``head_kwargs``) on an exact bf16
    case: objective and CE within 1e-5 of float64 math on its logits, the bf16 gradients within
    bf16 rounding (2e-2 of the largest entry) of float64."""
    out, gh, gw = head(div, *case, ce_weight=0.7, kd_weight=1.3, chunk_size=16,
                       compute_ce=True, **head_kwargs)
    ref_obj, ref_ce, r_h, r_w = bf16_head_reference(div, *case, 0.7, 1.3)
    torch.testing.assert_close(out.objective.double(), ref_obj, atol=0, rtol=1e-5)
    torch.testing.assert_close(out.ce.double(), ref_ce, atol=0, rtol=1e-5)
    for got, want in ((gh, r_h), (gw, r_w)):
        assert got.dtype == torch.bfloat16
        scale = float(want.abs().max())
        torch.testing.assert_close(got.double(), want, atol=2e-2 * scale, rtol=2e-2)


@pytest.mark.parametrize("float32_weight_grad", [True, False])
@pytest.mark.parametrize("name", sorted(DIVERGENCES) + ["ce_only"])
def test_fused_head_bf16(name, float32_weight_grad):
    """bf16: the fused head's objective and CE are float64 math on the bf16 logits within 1e-5,
    its gradients within bf16 rounding of float64, whether the weight gradient is summed in
    float32 or (``fused_float32_weight_grad: false``) in bf16 over the 9 chunks."""
    div = None if name == "ce_only" else DIVERGENCES[name]()
    assert_bf16_head_is_float64_math(div, exact_bf16_case(32),
                                     float32_weight_grad=float32_weight_grad)


#: the compiled GPU head's cases: each registered divergence and CE alone. The cases that only
#: change a constant (``tad_k1``, ``drkl_gamma2.5``) run eagerly in bf16 above: compiled, each
#: cost 2-3 inductor compiles more in the GPU check's pytest step, whose cap it shares
COMPILED_CASES = sorted(n for n in DIVERGENCES if n in REGISTERED) + ["ce_only"]


@pytest.mark.parametrize("name", COMPILED_CASES)
def test_compiled_fused_head_bf16(name):
    """The head as the GPU configs run it: bf16, its chunks through inductor (the Triton code,
    under the head's GPU settings: ``fused.INDUCTOR_OPTIONS`` and the divergence's
    ``gpu_inductor_options``), a row's teacher projections kept (its first chunk in halves),
    the weight gradient summed in bf16: the objective and CE within 1e-5 of float64 math on the
    exact bf16 logits, the gradients within bf16 rounding of float64, as the eager head's
    (``test_fused_head_bf16``)."""
    torch._dynamo.reset()
    div = None if name == "ce_only" else DIVERGENCES[name]()
    assert_bf16_head_is_float64_math(div, exact_bf16_case(33), float32_weight_grad=False,
                                     teacher_cache_mib=None, compile_chunks=True)


@pytest.mark.parametrize("kind,name", [("top_m", "drkl"), ("sampled", "tad")])
def test_compiled_fused_head_from_a_cache(kind, name):
    """A teacher cache's closed forms through inductor on the GPU (the bucket cache's DRKL: its
    autograd on the M + 1 outcomes, its scatters; the sampled cache's TAD), float64, Gemma2's
    student soft-cap, ignored positions: the values, diagnostics and gradients of the unfused
    path on the materialised logits (``tests/losses/test_cached.py``)."""
    from tad_torchtune.losses import DRKLLoss, TADLoss
    from tad_torchtune.losses.cached import teacher_sampled, teacher_top_m
    from tests.losses.test_cached import assert_fused_from_cache_equals_unfused

    torch._dynamo.reset()
    h_s, w_s, h_t, w_t, labels = make_case(41, torch.float64)
    logits = h_t @ w_t.T
    cache = (teacher_top_m(logits, labels, 20) if kind == "top_m" else
             teacher_sampled(logits, 10, 6, seed=2, blocks=torch.arange(h_t.shape[0])))
    div = DRKLLoss() if name == "drkl" else TADLoss(k=5)
    h_s, w_s, labels = on_cuda((h_s, w_s * 4, labels))
    assert (labels == IGNORE).any()
    assert_fused_from_cache_equals_unfused(div, cache.to(h_s.device), h_s, w_s, labels,
                                           student_softcap=3.0, compile_chunks=True)


# ----------------------------------------------------------------------------- Liger-Kernel


def test_liger_fused_jsd_is_forward_kl_at_the_benchmarked_beta():
    """``loss_bench.py``'s ``liger_fused_jsd`` case is Liger's fused linear JSD at
    ``LIGER_FORWARD_KL_BETA``, the divergence alone: that loss and its gradients are our forward
    KL's, mean over valid tokens, with the masked prompt and padding of ``make_case``; the other
    end of its beta range is our reverse KL (so the direction is pinned, not just "a KL")."""
    pytest.importorskip("liger_kernel.chunked_loss")
    case = on_cuda(make_case(51))
    for beta, name in ((loss_bench.LIGER_FORWARD_KL_BETA, "forward_kl"),
                       (1.0 - loss_bench.LIGER_FORWARD_KL_BETA, "reverse_kl")):
        loss_fn = loss_bench.liger_jsd_loss(case[0].device.type, beta=beta, compiled=False)
        h_s, w_s = (x.detach().clone().requires_grad_(True) for x in case[:2])
        h_t, w_t, labels = case[2:]
        loss = loss_fn(h_s.view(-1, D), w_s, h_t.view(-1, D_T), w_t, labels.view(-1))
        loss.backward()
        out, r_h, r_w = fused(DIVERGENCES[name](), *case)
        n = float(out.num_tokens)
        torch.testing.assert_close(loss.detach(), out.total.detach() / n, atol=0, rtol=1e-5,
                                   msg=lambda m: f"beta={beta} vs our {name}: {m}")
        for got, want in ((h_s.grad, r_h / n), (w_s.grad, r_w / n)):
            torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=1e-5)


# ------------------------------------------------------------------ document-masked attention


def test_flex_document_mask_equals_the_dense_one():
    """``document_mask`` on CUDA: the recipe hands Qwen2 (torchtune's MultiHeadAttention) a flex
    ``BlockMask`` (``supports_flex_attention``), which torchtune runs with compiled flex
    attention. Float32 (no TF32): its logits and parameter gradients equal those under the
    dense mask (SDPA) within 1e-4 of the largest, on rows of documents crossing flex's
    128-token blocks."""
    from torchtune.models.qwen2 import qwen2

    from tad_torchtune.data import document_attention
    from tad_torchtune.models import forward_hidden, project_logits, supports_flex_attention
    from tests.helpers.teachers import VOCAB, teacher_node

    # the tiny Qwen2 of the CPU tests, 300 positions long, with heads of 32 (flex's kernels
    # multiply blocks of at least 16)
    torch.manual_seed(0)
    node = {**teacher_node("qwen2"), "embed_dim": 128, "max_seq_len": 512}
    del node["_component_"]
    model = qwen2(**node).cuda()
    assert supports_flex_attention("cuda", model)
    lengths = [[40, 150, 110], [300], [1, 128, 171]]
    docs = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)])
                        for row in lengths]).cuda()
    tokens = torch.randint(0, VOCAB, docs.shape, generator=torch.Generator().manual_seed(0)).cuda()

    def logits_and_grads(flex: bool):
        mask, input_pos = document_attention(docs, flex=flex)
        model.zero_grad(set_to_none=True)
        logits = project_logits(model, forward_hidden(model, tokens, mask=mask,
                                                      input_pos=input_pos)[0])
        logits.square().mean().backward()
        return [logits.detach()] + [p.grad.clone() for p in model.parameters()]

    for got, want in zip(logits_and_grads(True), logits_and_grads(False)):
        scale = float(want.abs().max())
        torch.testing.assert_close(got, want, atol=1e-4 * scale, rtol=1e-4)


def test_flex_sliding_window_equals_the_dense_one():
    """A Mistral whose config.json has a sliding window (50 positions here) under
    ``document_mask`` on CUDA: the window added to the flex ``BlockMask`` (its ``mask_mod``,
    ``models/_window.py``), run by torchtune's compiled flex attention, gives the logits and
    gradients of the dense windowed mask (SDPA) within 1e-4 of the largest, on rows of 300
    positions; plain rows (no mask) run the model's own flex band, which equals SDPA under the
    dense band."""
    from tad_torchtune.data import document_attention
    from tad_torchtune.models import (
        forward_hidden,
        model_from_hf_config,
        project_logits,
        sliding_window,
        supports_flex_attention,
    )
    from tests.helpers.teachers import VOCAB

    torch.manual_seed(0)
    model = model_from_hf_config(dict(
        model_type="mistral", vocab_size=VOCAB, hidden_size=128, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, sliding_window=50))[0].cuda()
    assert supports_flex_attention("cuda", model) and sliding_window(model) == 50
    lengths = [[40, 150, 110], [300], [1, 128, 171]]
    docs = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)])
                        for row in lengths]).cuda()
    tokens = torch.randint(0, VOCAB, docs.shape, generator=torch.Generator().manual_seed(0)).cuda()

    def logits_and_grads(mask, input_pos):
        model.zero_grad(set_to_none=True)
        logits = project_logits(model, forward_hidden(model, tokens, mask=mask,
                                                      input_pos=input_pos)[0])
        logits.square().mean().backward()
        return [logits.detach()] + [p.grad.clone() for p in model.parameters()]

    checks = [(logits_and_grads(*document_attention(docs, flex=True)),
               logits_and_grads(*document_attention(docs)))]
    # plain rows: the flex band the model makes itself (model_mask), against SDPA's dense band
    from torch.nn.attention.flex_attention import BlockMask

    from tad_torchtune.models._window import model_mask, windowed_mask

    assert isinstance(model_mask(model, tokens, mask=None), BlockMask)
    dense_band = windowed_mask(None, 50, kv_len=tokens.shape[1], device=tokens.device)
    checks.append((logits_and_grads(None, None), logits_and_grads(dense_band, None)))
    for flex, dense in checks:
        for got, want in zip(flex, dense):
            scale = float(want.abs().max())
            torch.testing.assert_close(got, want, atol=1e-4 * scale, rtol=1e-4)


# ----------------------------------------------------------------------------- the recipe


def test_compiled_bf16_recipe_matches_eager(tmp_path):
    """``tune run tad_distill`` on the GPU, bf16, the fused head, 2 steps at a constant learning
    rate, with ``compile: true`` (every block and the per-chunk loss functions through inductor)
    and without: both losses finite, and equal within 2e-2 relative (5 bf16 roundings, 2**-8
    each: inductor keeps a fused kernel's intermediates in float32 where eager rounds each
    op's output to bf16). The compiled run's inductor cache must hold compiled kernels."""
    assets = tune.make_assets(tmp_path / "assets")
    inductor_cache = tmp_path / "inductor"

    def run(name: str, compile: bool):
        out = tmp_path / name
        out.mkdir()
        cfg = tune.base_config(assets, out, device="cuda", dtype="bf16", fused=True,
                               compile=compile, max_steps=2, lr_scheduler=None,
                               validation_dataset=None, export_hf=False)
        env = {"TORCHINDUCTOR_CACHE_DIR": str(inductor_cache)} if compile else {}
        tune.run_tune(["tad_distill", "--config", str(tune.write_config(cfg, out / "c.yaml"))],
                      cwd=tmp_path, env=env)
        return tune.train_losses(out)

    with ThreadPoolExecutor(2) as pool:  # one GPU, two tiny runs: side by side
        compiled, eager = pool.map(lambda a: run(*a), [("compiled", True), ("eager", False)])
    assert sorted(compiled) == sorted(eager) == [1, 2]
    for step in (1, 2):
        assert math.isfinite(compiled[step]) and math.isfinite(eager[step])
        assert math.isclose(compiled[step], eager[step], rel_tol=2e-2), (step, compiled, eager)
    kernels = [p for p in inductor_cache.rglob("*") if p.is_file()]
    assert kernels, "the compiled run left no inductor output: nothing was compiled"
