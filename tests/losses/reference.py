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
