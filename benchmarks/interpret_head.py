"""The fused head's compiled code as a GPU would run it, executed on this CPU by Triton's
interpreter, against the eager head: the loss and both gradients, case by case.

    python benchmarks/interpret_head.py [--cases tad:teacher:bfloat16 ...] [--json PATH]

``compile: true`` hands the head's chunk functions to inductor, which on a GPU generates Triton
kernels under settings and rewrites it applies on GPUs only (the online softmax, its
store-or-recompute thresholds, a divergence's ``gpu_inductor_options``). That code has never
run where no GPU is lent; the CPU runs inductor's C++ code instead. Here inductor generates
the GPU's code (``head_kernels.gpu_emulation``) and Triton's interpreter runs it
(``head_kernels.triton_interpreted``), so its numerics are checked before a GPU meets it.

A case is ``DIVERGENCE:SOURCE:DTYPE``: a divergence of ``tad_torchtune.losses`` (or ``ce``, the
cross-entropy alone), the teacher's ``teacher`` logits (from hidden states and a weight; with
``teacher+softcap`` both models' logits soft-capped at 30, as Gemma2's), or its ``sampled`` or
``top_m`` cache, and the inputs' dtype. Inputs: 2 rows of 48 tokens (the first 3 ignored),
vocabulary 300, width 32, chunks of 16 tokens, the GPU configs' other head settings (every
teacher projection kept, so rows of three chunks run their first in halves; the weight
gradient summed in the weight's dtype). Reported: ``|compiled - eager| / max |eager|`` of the
objective, the hidden states' and the weight's gradients, within a float32 rounding
(``FLOAT32_LIMIT``); in bf16, where each head rounds its gradients to bf16 in its own order,
the objective so and each gradient's error against the float64 eager head at most
``BF16_FACTOR`` times the bf16 eager head's. Exit 1 when a case is past them. The interpreter
runs each kernel block by block on NumPy: 31 s for the default cases on two cores. Needs the
``triton`` package (in the test extras) and a fresh process.
"""

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

# before torch: inductor's helper kernels are decorated for the interpreter when imported
os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

if importlib.util.find_spec("tad_torchtune") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import head_kernels  # noqa: E402  (the GPU emulation)
import loss_bench  # noqa: E402  (the GPU configs' head settings)

from tad_torchtune.losses import DIVERGENCES  # noqa: E402
from tad_torchtune.losses.cached import teacher_sampled, teacher_top_m  # noqa: E402
from tad_torchtune.losses.fused import fused_head  # noqa: E402

ROWS, TOKENS, VOCAB, HIDDEN, CHUNK, IGNORED, SOFTCAP = 2, 48, 300, 32, 16, 3, 30.0
#: float32: the largest ``|compiled - eager| / max |eager|`` of the objective and gradients;
#: bf16: of the objective (summed in float32), and how much larger than the eager head's the
#: compiled head's gradient error against the float64 head may be
FLOAT32_LIMIT, BF16_OBJECTIVE_LIMIT, BF16_FACTOR = 1e-5, 1e-3, 1.5
DTYPES = ("float32", "bfloat16")
SOURCES = ("teacher", "teacher+softcap", "sampled", "top_m")
#: every divergence from the teacher's logits in both dtypes, each cache with the divergences
#: it serves, the soft-caps with TAD and forward KL
DEFAULT_CASES = (
    [f"{d}:teacher:{t}" for d in [*DIVERGENCES, "ce"] for t in ("float32", "bfloat16")]
    + [f"{d}:teacher+softcap:bfloat16" for d in ("tad", "forward_kl")]
    + [f"{d}:sampled:bfloat16" for d in ("tad", "forward_kl")]
    + [f"{d}:top_m:bfloat16" for d in DIVERGENCES])


def parse_case(case: str) -> tuple[str, str, torch.dtype]:
    name, source, dtype = (case.split(":") + ["", ""])[:3]
    if name not in (*DIVERGENCES, "ce") or source not in SOURCES or dtype not in DTYPES:
        raise ValueError(f"case {case!r}: DIVERGENCE:SOURCE:DTYPE with DIVERGENCE one of "
                         f"{[*DIVERGENCES, 'ce']}, SOURCE one of {list(SOURCES)}, DTYPE one of "
                         f"{list(DTYPES)}")
    if name == "ce" and source != "teacher":
        raise ValueError(f"case {case!r}: the CE alone reads no teacher (SOURCE teacher)")
    return name, source, getattr(torch, dtype)


def inputs(dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h_s = torch.randn(ROWS, TOKENS, HIDDEN, generator=gen).to(dtype)
    w_s = (torch.randn(VOCAB, HIDDEN, generator=gen) * HIDDEN**-0.5).to(dtype)
    h_t = (torch.randn(ROWS, TOKENS, HIDDEN, generator=gen) * 1.5).to(dtype)
    w_t = (torch.randn(VOCAB, HIDDEN, generator=gen) * HIDDEN**-0.5).to(dtype)
    labels = torch.randint(0, VOCAB, (ROWS, TOKENS), generator=gen)
    labels[:, :IGNORED] = -100
    return h_s, w_s, h_t, w_t, labels


def head(name: str, source: str, tensors, compile_chunks: bool,
         dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """The objective and the student's two gradients of one head call, the inputs cast to
    ``dtype`` (the float64 reference; a cache's entries are the same for every call)."""
    h_s, w_s, h_t, w_t, labels = tensors
    div = None if name == "ce" else DIVERGENCES[name]()
    teacher: dict = {}
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
    if div is not None and source.startswith("teacher"):
        teacher = {"teacher_hidden": cast(h_t), "teacher_weight": cast(w_t)}
        if source == "teacher+softcap":
            teacher.update(student_softcap=SOFTCAP, teacher_softcap=SOFTCAP)
    elif div is not None:
        logits = (h_t @ w_t.T).float()
        teacher = {"teacher_cache": (
            teacher_sampled(logits, *head_kernels.SAMPLED_CACHE, seed=0,
                            blocks=torch.arange(ROWS)) if source == "sampled"
            else teacher_top_m(logits, labels, head_kernels.TOP_M_CACHE))}
    options = {**loss_bench.RECIPE_HEAD, "compile_chunks": compile_chunks, "chunk_size": CHUNK}
    h, w = (cast(t).detach().requires_grad_(True) for t in (h_s, w_s))  # fresh leaves
    out = fused_head(h, w, labels, divergence=div, compute_ce=True, ignore_index=-100,
                     **teacher, **options)
    out.objective.backward()
    return out.objective.detach().double(), h.grad.double(), w.grad.double()


def errors(got, ref) -> list[float]:
    """``|got - ref| / max |ref|`` of the objective and the two gradients."""
    return [float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
            for a, b in zip(got, ref)]


def check(name: str, source: str, dtype: torch.dtype) -> dict:
    """One case: the compiled head against the eager one; in bf16 also both against the
    float64 eager head, the compiled gradients' error at most ``BF16_FACTOR`` times the eager
    ones' (each rounds its gradients to bf16, in its own order)."""
    tensors = inputs(dtype)
    eager = head(name, source, tensors, compile_chunks=False)
    compiled = head(name, source, tensors, compile_chunks=True)
    vs_eager = errors(compiled, eager)
    row = {"vs_eager": vs_eager}
    if dtype == torch.float32:
        row["ok"] = max(vs_eager) <= FLOAT32_LIMIT
    else:
        reference = head(name, source, tensors, compile_chunks=False, dtype=torch.float64)
        row["compiled_vs_float64"] = errors(compiled, reference)
        row["eager_vs_float64"] = errors(eager, reference)
        row["ok"] = vs_eager[0] <= BF16_OBJECTIVE_LIMIT and all(
            c <= BF16_FACTOR * e + FLOAT32_LIMIT
            for c, e in zip(row["compiled_vs_float64"][1:], row["eager_vs_float64"][1:]))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES,
                        metavar="DIVERGENCE:SOURCE:DTYPE")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    try:
        cases = [(c, *parse_case(c)) for c in args.cases]
    except ValueError as err:
        parser.error(str(err))
    rows = []
    with head_kernels.triton_interpreted():
        for case, name, source, dtype in cases:
            rows.append({"case": case, **check(name, source, dtype)})
            r = rows[-1]
            line = "objective, gradients vs eager " + " ".join(f"{x:.1e}" for x in r["vs_eager"])
            if "compiled_vs_float64" in r:
                line += ("; vs float64, compiled " + " ".join(
                    f"{x:.1e}" for x in r["compiled_vs_float64"][1:]) + ", eager " + " ".join(
                    f"{x:.1e}" for x in r["eager_vs_float64"][1:]))
            print(f"{case:<28} {line}  {'ok' if r['ok'] else 'PAST THE LIMIT'}", flush=True)
            if args.json:  # after every case: a run stopped part-way keeps what it checked
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
