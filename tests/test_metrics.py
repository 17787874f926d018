"""Held-out metrics against hand-computed values and naive Python loops."""

import math

import pytest
import torch

from tad_torchtune.metrics import TAIL_KS, StudentMetrics, TeacherMetrics


def logits_of(probs: list[list[float]]) -> torch.Tensor:
    """``[1, T, V]`` logits whose softmax is ``probs`` (each row sums to 1)."""
    return torch.tensor(probs, dtype=torch.float64).log().unsqueeze(0)


# -------------------------------------------------------------------------- hand-computed values
def test_student_metrics_hand_computed():
    # two valid tokens and one ignored token whose logits are NaN
    q = [[0.62, 0.23, 0.15], [0.44, 0.37, 0.19], [0.3, 0.3, 0.4]]
    p = [[0.50, 0.30, 0.20], [0.10, 0.10, 0.80], [0.3, 0.3, 0.4]]
    student, teacher = logits_of(q).float(), logits_of(p).float()
    student[0, 2] = float("nan")
    teacher[0, 2] = float("nan")
    labels = torch.tensor([[0, 2, -100]])
    m = StudentMetrics(num_bins=10)
    m.update(student, teacher, labels)
    out = m.compute()

    kl = sum(pi * math.log(pi / qi) for i in range(2) for pi, qi in zip(p[i], q[i])) / 2
    ce = (-math.log(0.62) - math.log(0.19)) / 2
    # Full-ECE, 10 bins. Bin 1 holds 0.15 and 0.19 and one label (0.19): |1 - 0.34|;
    # bins 2, 3, 4 hold 0.23, 0.37, 0.44 and no label; bin 6 holds 0.62 and one label: |1 - 0.62|
    full_ece = (abs(1 - 0.34) + 0.23 + 0.37 + 0.44 + abs(1 - 0.62)) / 2
    assert out["num_tokens"] == 2
    assert out["kl"] == pytest.approx(kl, rel=1e-5)
    assert out["ce"] == pytest.approx(ce, rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(ce), rel=1e-5)
    assert out["full_ece"] == pytest.approx(full_ece, rel=1e-5)
    assert full_ece == pytest.approx(1.04)
    assert out["top1_accuracy"] == 0.5  # token 0 right, token 1 predicts 0, label 2
    assert out["top1_agreement"] == 0.5  # teacher argmax: 0, 2; student argmax: 0, 0
    rel = out["reliability"]
    assert rel["count"] == [0, 2, 1, 1, 1, 0, 1, 0, 0, 0]
    assert rel["accuracy"][1] == 0.5 and rel["confidence"][1] == pytest.approx(0.17, rel=1e-5)


def test_full_ece_is_zero_for_a_confident_correct_model():
    logits = torch.full((1, 4, 5), -30.0)
    labels = torch.tensor([[0, 3, 1, 4]])
    logits[0, torch.arange(4), labels[0]] = 30.0
    m = StudentMetrics()
    m.update(logits, logits, labels)
    out = m.compute()
    assert out["full_ece"] == pytest.approx(0.0, abs=1e-12)
    assert out["kl"] == pytest.approx(0.0, abs=1e-12)
    assert out["top1_agreement"] == 1.0 and out["top1_accuracy"] == 1.0


def test_teacher_tail_mass_and_mismatch_hand_computed():
    p = [[0.5, 0.25, 0.125, 0.0625, 0.0625], [0.05, 0.6, 0.2, 0.1, 0.05]]
    labels = torch.tensor([[1, 1]])
    m = TeacherMetrics(ks=(1, 2, 3))
    m.update(logits_of(p), labels)
    out = m.compute()
    assert out["tail_mass"][1] == pytest.approx((0.5 + 0.4) / 2, rel=1e-6)
    assert out["tail_mass"][2] == pytest.approx((0.25 + 0.2) / 2, rel=1e-6)
    assert out["tail_mass"][3] == pytest.approx((0.125 + 0.1) / 2, rel=1e-6)
    assert out["mismatch_rate"] == 0.5  # token 0: mode 0, label 1; token 1: mode 1, label 1
    assert out["ce"] == pytest.approx((-math.log(0.25) - math.log(0.6)) / 2, rel=1e-6)


def test_tail_mass_is_computed_in_log_space():
    # alpha_1 = 4 e^-60 / (e^0 + 4 e^-60) ~ 3.5e-26: 1 - p_top is exactly 0 in float32
    logits = torch.tensor([[[60.0, 0.0, 0.0, 0.0, 0.0]]])
    m = TeacherMetrics(ks=(1, 2))
    m.update(logits, torch.tensor([[0]]))
    tail = m.compute()["tail_mass"]
    assert tail[1] == pytest.approx(4 * math.exp(-60), rel=1e-4)
    assert tail[2] == pytest.approx(3 * math.exp(-60), rel=1e-4)


# ---------------------------------------------------------------------------- naive references
def naive_student(student, teacher, labels, num_bins=10):
    """Per-token Python loops over float64 probabilities."""
    kl = ce = agree = correct = 0.0
    bin_label = [0.0] * num_bins
    bin_prob = [0.0] * num_bins
    n = 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            y = int(labels[b, t])
            if y == -100:
                continue
            n += 1
            q = torch.softmax(student[b, t].double(), -1).tolist()
            p = torch.softmax(teacher[b, t].double(), -1).tolist()
            kl += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)
            ce -= math.log(q[y])
            top_q = max(range(len(q)), key=lambda i: (q[i], -i))
            top_p = max(range(len(p)), key=lambda i: (p[i], -i))
            agree += top_q == top_p
            correct += top_q == y
            for k, qk in enumerate(q):
                m = min(int(qk * num_bins), num_bins - 1)
                bin_prob[m] += qk
                bin_label[m] += k == y
    ece = sum(abs(a - c) for a, c in zip(bin_label, bin_prob)) / n
    return {"kl": kl / n, "ce": ce / n, "top1_agreement": agree / n,
            "top1_accuracy": correct / n, "full_ece": ece, "num_tokens": n}


def naive_teacher(teacher, labels, ks):
    tail = {k: 0.0 for k in ks}
    mismatch = 0
    n = 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            y = int(labels[b, t])
            if y == -100:
                continue
            n += 1
            p = torch.softmax(teacher[b, t].double(), -1).tolist()
            ranked = sorted(p, reverse=True)
            for k in ks:
                tail[k] += 1.0 - sum(ranked[:k])
            mode = max(range(len(p)), key=lambda i: (p[i], -i))
            mismatch += mode != y
    return {k: v / n for k, v in tail.items()}, mismatch / n


def random_batch(seed, b=3, t=11, v=67, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, t, v, generator=g) * 2.5
    teacher = torch.randn(b, t, v, generator=g) * 3.0
    labels = torch.randint(0, v, (b, t), generator=g)
    ignored = torch.rand(b, t, generator=g) < ignore_frac
    labels[ignored] = -100
    student[ignored] = float("nan")  # must not leak
    teacher[ignored] = float("inf")
    return student, teacher, labels


@pytest.mark.parametrize("chunk_size", [None, 1, 5, 1024])
def test_student_metrics_match_naive_loop_streaming(chunk_size):
    batches = [random_batch(seed) for seed in range(3)]
    m = StudentMetrics(chunk_size=chunk_size)
    for s, t, y in batches:
        m.update(s, t, y)
    out = m.compute()
    s = torch.cat([b[0] for b in batches])
    t = torch.cat([b[1] for b in batches])
    y = torch.cat([b[2] for b in batches])
    ref = naive_student(s, t, y)
    assert out["num_tokens"] == ref["num_tokens"]
    for key in ("kl", "ce", "full_ece", "top1_agreement", "top1_accuracy"):
        assert out[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_teacher_metrics_match_naive_loop(chunk_size):
    ks = (1, 2, 5, 10, 20, 50)
    batches = [random_batch(seed) for seed in range(10, 13)]
    m = TeacherMetrics(ks=ks, chunk_size=chunk_size)
    for _, t, y in batches:
        m.update(t, y)
    out = m.compute()
    t = torch.cat([b[1] for b in batches])
    y = torch.cat([b[2] for b in batches])
    tail, mismatch = naive_teacher(t, y, ks)
    for k in ks:
        assert out["tail_mass"][k] == pytest.approx(tail[k], rel=1e-5, abs=1e-7), k
    assert out["mismatch_rate"] == pytest.approx(mismatch)
    assert out["mismatch_rate"] == pytest.approx(1 - out["top1_accuracy"])


def test_bf16_logits_and_truncated_teacher_vocab():
    s, t, y = random_batch(3, v=40)
    t = torch.cat([t, torch.randn(*t.shape[:2], 8)], dim=-1)  # padded teacher vocabulary
    m = StudentMetrics(vocab_alignment="truncate_teacher")
    m.update(s.bfloat16(), t.bfloat16(), y)
    ref = naive_student(s.bfloat16().float(), t[..., :40].bfloat16().float(), y)
    out = m.compute()
    assert out["kl"] == pytest.approx(ref["kl"], rel=1e-4)
    with pytest.raises(ValueError, match="vocab"):
        StudentMetrics().update(s, t, y)


def test_empty_and_invalid_inputs():
    m = StudentMetrics()
    s = torch.randn(1, 3, 5)
    m.update(s, s, torch.full((1, 3), -100))
    out = m.compute()
    assert out["num_tokens"] == 0 and math.isnan(out["kl"])
    with pytest.raises(ValueError, match="smaller|< the vocabulary"):
        TeacherMetrics(ks=(1, 5)).update(s, torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels shape"):
        StudentMetrics().update(s, s, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="ks"):
        TeacherMetrics(ks=(0,))
    assert TAIL_KS == (1, 2, 5, 10, 20, 50)


def test_metrics_from_hidden_states_equal_metrics_from_logits():
    """The fused path's evaluation (logits projected chunk by chunk, soft-capped) gives the
    values of ``update`` on the materialised logits."""
    g = torch.Generator().manual_seed(7)
    h_s, h_t = torch.randn(2, 9, 6, generator=g), torch.randn(2, 9, 10, generator=g)
    w_s, w_t = torch.randn(31, 6, generator=g), torch.randn(35, 10, generator=g)
    labels = torch.randint(0, 31, (2, 9), generator=g)
    labels[1, -3:] = -100
    caps = (4.0, 6.0)
    by_logits = StudentMetrics(chunk_size=4, vocab_alignment="truncate_teacher")
    by_logits.update(torch.tanh(h_s @ w_s.T / caps[0]) * caps[0],
                     torch.tanh(h_t @ w_t.T / caps[1]) * caps[1], labels)
    by_hidden = StudentMetrics(chunk_size=4, vocab_alignment="truncate_teacher")
    by_hidden.update_from_hidden(h_s, w_s, h_t, w_t, labels, student_softcap=caps[0],
                                 teacher_softcap=caps[1])
    a, b = by_logits.compute(), by_hidden.compute()
    assert a["num_tokens"] == b["num_tokens"] == 15
    for key in ("kl", "ce", "full_ece", "top1_agreement", "top1_accuracy"):
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), key
    assert b["kl"] > 0.1


def test_metrics_from_hidden_states_add_the_output_biases():
    """Phi-2's output projection has a bias: the projected chunks add it, as its logits do."""
    g = torch.Generator().manual_seed(8)
    h_s, h_t = torch.randn(2, 9, 6, generator=g), torch.randn(2, 9, 10, generator=g)
    w_s, w_t = torch.randn(31, 6, generator=g), torch.randn(31, 10, generator=g)
    b_s, b_t = torch.randn(31, generator=g) * 2, torch.randn(31, generator=g) * 2
    labels = torch.randint(0, 31, (2, 9), generator=g)
    by_logits = StudentMetrics(chunk_size=4)
    by_logits.update(h_s @ w_s.T + b_s, h_t @ w_t.T + b_t, labels)
    by_hidden = StudentMetrics(chunk_size=4)
    by_hidden.update_from_hidden(h_s, w_s, h_t, w_t, labels, student_bias=b_s, teacher_bias=b_t)
    without = StudentMetrics(chunk_size=4)
    without.update_from_hidden(h_s, w_s, h_t, w_t, labels)
    a, b, c = by_logits.compute(), by_hidden.compute(), without.compute()
    for key in ("kl", "ce", "full_ece", "top1_agreement"):
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), key
    assert abs(c["kl"] - a["kl"]) > 1e-3  # the biases matter here
