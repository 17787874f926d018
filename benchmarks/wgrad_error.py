"""The error of the output-weight gradient that the fused head's two sums leave in one optimizer
step of bf16 training, against the exact sum (issue 19, item 5: the weight gradient in bf16 or
float32 "by measured error").

    python benchmarks/wgrad_error.py [--vocab 32000] [--hidden 256] [--chunk 1024]
        [--chunks 8] [--micro-batches 32] [--json FILE]

What a step does with the ``[V, D]`` output weight's gradient, in the recipe with bf16
parameters (``dtype: bf16``): each micro-batch, the fused head sums ``grad.T @ h`` over its
chunks (``fused.py``, ``_accumulate_weight_grad``), scales the sum by the objective's gradient
(``1 / tokens``) and hands it to autograd in bf16, which adds it to the parameter's bf16
``.grad``; ``gradient_accumulation_steps`` micro-batches make the step. Two ways of summing over
the chunks, as a GPU runs them (cuBLAS, float32 accumulation inside every product):

- ``float32`` (``fused_float32_weight_grad: true``): each product added into a float32 sum
  inside the matmul (``torch.addmm(..., out_dtype=torch.float32)``); one rounding to bf16 per
  micro-batch, as every other weight of the model gets.
- ``bf16`` (``false``, Liger-Kernel's way): ``grad_w.addmm_(grad.T, h)`` in bf16, the running
  sum rounded to bf16 after every chunk.

Both are emulated exactly here, on any device: a bf16 product with float32 accumulation is the
float32 product of the bf16 values (up to the order of the sums), and a bf16 result is its
float32 value rounded. The exact gradient is the float64 sum of the float64 products of the same
bf16 values. The inputs are a CE + forward-KL head's: student logits ``h @ W.T`` of hidden states
``h`` and weights scaled as a trained model's (logits of standard deviation ``--logit-std``),
labels drawn from a Zipf law over the vocabulary (text's word frequencies: some rows of ``W``
get a gradient from many tokens, most from few), teacher logits the student's plus noise; the
chunk's gradient ``(softmax(z) - onehot(y)) + (softmax(z) - softmax(z_t))``, cast to bf16 as the
head casts it.

Reported per way, and for the exact gradient rounded to bf16 once (the floor): the relative
error of the step's gradient (Frobenius norm of the difference over that of the exact gradient)
and the median relative error of its entries among the 10% of largest magnitude, where AdamW's
update follows the gradient most closely. The figures depend on the number of roundings
(``--chunks`` per micro-batch, ``--micro-batches``) and on the gradient's structure, not on the
device: the CPU measures what the GPU will do.
"""

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

WAYS = ("float32", "bf16")


def make_chunk(gen: torch.Generator, w: torch.Tensor, chunk: int, logit_std: float,
               zipf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's bf16 logit gradient ``[chunk, V]`` and bf16 hidden states ``[chunk, D]``."""
    hidden = w.shape[1]
    h = torch.randn(chunk, hidden, generator=gen).bfloat16()
    z = h.float() @ w.float().T * (logit_std / hidden**0.5)
    y = torch.multinomial(zipf, chunk, replacement=True, generator=gen)
    q = z.softmax(-1)
    p = (z + torch.randn(z.shape, generator=gen)).softmax(-1)
    grad = 2 * q - p
    grad[torch.arange(chunk), y] -= 1.0
    return grad.bfloat16(), h


def step_errors(vocab: int, hidden: int, chunk: int, chunks: int, micro_batches: int,
                logit_std: float = 3.0, seed: int = 0) -> dict[str, dict[str, float]]:
    """Run one optimizer step's micro-batches and return, per way of summing (``WAYS``), the
    relative Frobenius error of the bf16 ``.grad`` and the median relative error of its largest
    10% of entries, against the float64 sum of the same products; and the same of the exact
    gradient rounded to bf16 once, the least error a bf16 ``.grad`` can have."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(vocab, hidden, generator=gen)
    zipf = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    scale = 1.0 / (chunk * chunks * micro_batches)  # the objective's gradient: 1 / tokens
    exact = torch.zeros(vocab, hidden, dtype=torch.float64)
    grads = {way: torch.zeros(vocab, hidden).bfloat16() for way in WAYS}  # the bf16 .grad
    for _ in range(micro_batches):
        sums = {"float32": torch.zeros(vocab, hidden),
                "bf16": torch.zeros(vocab, hidden).bfloat16()}
        for _ in range(chunks):
            g, h = make_chunk(gen, w, chunk, logit_std, zipf)
            exact += g.double().T @ h.double()
            product = g.float().T @ h.float()  # a bf16 GEMM's float32 accumulation
            sums["float32"] += product
            sums["bf16"] = (sums["bf16"].float() + product).bfloat16()  # beta = 1, bf16 C
        for way in WAYS:
            # the head's backward: the sum times 1 / tokens (in its own dtype), then bf16
            part = sums[way].mul_(scale).bfloat16()
            # autograd's accumulation into a bf16 .grad: float32 arithmetic, rounded
            grads[way] = (grads[way].float() + part.float()).bfloat16()
    exact *= scale
    top = exact.abs() >= exact.abs().flatten().kthvalue(int(0.9 * exact.numel())).values
    grads["exact, rounded to bf16 once"] = exact.bfloat16()  # the floor of a bf16 .grad
    out = {}
    for way in grads:
        diff = grads[way].double() - exact
        out[way] = {"relative_error": float(diff.norm() / exact.norm()),
                    "top10_median_relative_error": float(
                        (diff[top].abs() / exact[top].abs()).median())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=1024, help="the recipe's loss_chunk_size")
    parser.add_argument("--chunks", type=int, default=8,
                        help="chunks per micro-batch (8192 tokens: 8 chunks of 1024)")
    parser.add_argument("--micro-batches", type=int, default=32,
                        help="gradient_accumulation_steps (the GPU configs' 32)")
    parser.add_argument("--logit-std", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    got = step_errors(args.vocab, args.hidden, args.chunk, args.chunks, args.micro_batches,
                      args.logit_std, args.seed)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}; "
          f"V {args.vocab}, D {args.hidden}, chunk {args.chunk}, {args.chunks} chunks x "
          f"{args.micro_batches} micro-batches, logit std {args.logit_std}, seed {args.seed}")
    print("| weight-gradient sum over chunks | relative error of the step's gradient | "
          "median relative error, largest 10% |")
    print("|---|---|---|")
    for way, x in got.items():
        print(f"| {way} | {x['relative_error']:.2e} | {x['top10_median_relative_error']:.2e} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "errors": got}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
