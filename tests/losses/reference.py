"""Naive float64 references for the divergences, written straight from the formulas.

They use probabilities (not log space) and explicit per-row loops, so they share no code path with
the implementation. Good for moderate logits only.
"""

import torch
from torch import Tensor


def _probs(s: Tensor, t: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    return torch.softmax(t.double() / temperature, -1), torch.softmax(s.double() / temperature, -1)


def _mean_over_valid(per_token: list[Tensor], n_valid: int) -> Tensor:
    if n_valid == 0:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack(per_token).sum() / n_valid


def forward_kl(s, t, labels, temperature=1.0, ignore_index=-100):
    p, q = _probs(s, t, temperature)
    valid = labels != ignore_index
    terms = [(p[b, i] * (p[b, i] / q[b, i]).log()).sum() for b, i in valid.nonzero().tolist()]
    return _mean_over_valid(terms, int(valid.sum()))


def reverse_kl(s, t, labels, temperature=1.0, ignore_index=-100):
    p, q = _probs(s, t, temperature)
    valid = labels != ignore_index
    terms = [(q[b, i] * (q[b, i] / p[b, i]).log()).sum() for b, i in valid.nonzero().tolist()]
    return _mean_over_valid(terms, int(valid.sum()))


def tad_token_parts(p_row: Tensor, q_row: Tensor, k: int) -> dict[str, Tensor]:
    """D_KL1, D_KL2 and the tail masses for one token, from its probability vectors."""
    order = sorted(range(p_row.shape[0]), key=lambda i: -float(p_row[i]))
    top, tail = order[:k], order[k:]
    alpha_t = 1 - p_row[top].sum()
    alpha_s = 1 - q_row[top].sum()
    dkl1 = (p_row[top] * (p_row[top] / q_row[top]).log()).sum() + alpha_t * (alpha_t / alpha_s).log()
    pt, qt = p_row[tail] / alpha_t, q_row[tail] / alpha_s
    dkl2 = (pt * (pt / qt).log()).sum()
    return {"dkl1": dkl1, "dkl2": dkl2, "alpha_t": alpha_t, "alpha_s": alpha_s, "top": top,
            "tail": tail}


def tad(s, t, labels, k, beta, temperature=1.0, ignore_index=-100):
    p, q = _probs(s, t, temperature)
    terms = []
    n_valid = 0
    for b in range(labels.shape[0]):
        idx = [i for i in range(labels.shape[1]) if labels[b, i] != ignore_index]
        parts = [tad_token_parts(p[b, i], q[b, i], k) for i in idx]
        if not parts:
            continue
        abar = sum(float(x["alpha_t"]) for x in parts) / len(parts)
        for x in parts:
            terms.append(x["dkl1"] + beta * x["alpha_t"] / abar * x["dkl2"])
        n_valid += len(parts)
    return _mean_over_valid(terms, n_valid)


def drkl_token_parts(p_row: Tensor, q_row: Tensor, y: int) -> tuple[Tensor, Tensor]:
    """(KL(bq||bp), KL(qh||ph)) for one token with label y."""
    qy, py = q_row[y], p_row[y]
    kl_bin = qy * (qy / py).log() + (1 - qy) * ((1 - qy) / (1 - py)).log()
    others = [i for i in range(p_row.shape[0]) if i != y]
    qh, ph = q_row[others] / (1 - qy), p_row[others] / (1 - py)
    return kl_bin, (qh * (qh / ph).log()).sum()


def drkl(s, t, labels, gamma, temperature=1.0, ignore_index=-100):
    p, q = _probs(s, t, temperature)
    valid = labels != ignore_index
    terms = []
    for b, i in valid.nonzero().tolist():
        kl_bin, kl_nt = drkl_token_parts(p[b, i], q[b, i], int(labels[b, i]))
        terms.append(kl_bin + gamma * kl_nt)
    return _mean_over_valid(terms, int(valid.sum()))


def tad_per_document(s, t, labels, document_ids, k, beta, temperature=1.0, ignore_index=-100):
    """TAD whose abar is the mean tail mass of each DOCUMENT of a row: every document of every
    row run through ``tad`` as a sequence of its own, the sums added up."""
    total, n_valid = torch.zeros((), dtype=torch.float64), 0
    for b in range(labels.shape[0]):
        for d in sorted(set(document_ids[b].tolist())):
            cols = (document_ids[b] == d).nonzero().squeeze(-1)
            y = labels[b : b + 1, cols]
            n = int((y != ignore_index).sum())
            if n:
                total = total + tad(s[b : b + 1, cols], t[b : b + 1, cols], y, k, beta,
                                    temperature, ignore_index) * n
                n_valid += n
    return total / max(n_valid, 1)


# ------------------------------------------------------------------ from a teacher cache (top-M)


def _cached_token(p_row: Tensor, q_row: Tensor, m: int):
    """The top-M ids of p (most probable first) and the bucket masses of p and q."""
    order = sorted(range(p_row.shape[0]), key=lambda i: -float(p_row[i]))
    top, rest = order[:m], order[m:]
    return top, rest, p_row[rest].sum(), q_row[rest].sum()


def _kl(a: list, b: list) -> Tensor:
    return sum(x * (x / y).log() for x, y in zip(a, b) if float(x.detach()) > 0)


def _cached_terms(s, t, labels, per_token, temperature=1.0, ignore_index=-100):
    p, q = _probs(s, t, temperature)
    valid = labels != ignore_index
    terms = [per_token(p[b, i], q[b, i], int(labels[b, i])) for b, i in valid.nonzero().tolist()]
    return _mean_over_valid(terms, int(valid.sum()))


def forward_kl_cached(s, t, labels, m, **kw):
    def token(p_row, q_row, y):
        top, _, p_rest, q_rest = _cached_token(p_row, q_row, m)
        return _kl([*p_row[top], p_rest], [*q_row[top], q_rest])

    return _cached_terms(s, t, labels, token, **kw)


def reverse_kl_cached(s, t, labels, m, **kw):
    def token(p_row, q_row, y):
        top, _, p_rest, q_rest = _cached_token(p_row, q_row, m)
        return _kl([*q_row[top], q_rest], [*p_row[top], p_rest])

    return _cached_terms(s, t, labels, token, **kw)


def drkl_cached(s, t, labels, m, gamma, **kw):
    def token(p_row, q_row, y):
        top, _, p_rest, q_rest = _cached_token(p_row, q_row, m)
        qy, py = q_row[y], p_row[y]
        kl_bin = _kl([qy, 1 - qy], [py, 1 - py])
        others = [i for i in top if i != y]
        if y in top:  # the label among the cached ids: the bucket is the rest
            qb, pb = q_rest, p_rest
        else:  # the label lies in the bucket: take it out
            qb, pb = q_rest - qy, p_rest - py
        qh = [x / (1 - qy) for x in [*q_row[others], qb]]
        ph = [x / (1 - py) for x in [*p_row[others], pb]]
        return kl_bin + gamma * _kl(qh, ph)

    return _cached_terms(s, t, labels, token, **kw)


def tad_cached(s, t, labels, k, m, beta, temperature=1.0, ignore_index=-100):
    p, q = _probs(s, t, temperature)
    terms, n_valid = [], 0
    for b in range(labels.shape[0]):
        idx = [i for i in range(labels.shape[1]) if labels[b, i] != ignore_index]
        parts = []
        for i in idx:
            top, _, p_rest, q_rest = _cached_token(p[b, i], q[b, i], m)
            head, mid = top[:k], top[k:]
            alpha_t, alpha_s = 1 - p[b, i][head].sum(), 1 - q[b, i][head].sum()
            dkl1 = _kl([*p[b, i][head], alpha_t], [*q[b, i][head], alpha_s])
            dkl2 = _kl([x / alpha_t for x in [*p[b, i][mid], p_rest]],
                       [x / alpha_s for x in [*q[b, i][mid], q_rest]])
            parts.append((dkl1, dkl2, alpha_t))
        if not parts:
            continue
        abar = sum(float(a) for _, _, a in parts) / len(parts)
        terms += [d1 + beta * a / abar * d2 for d1, d2, a in parts]
        n_valid += len(parts)
    return _mean_over_valid(terms, n_valid)
