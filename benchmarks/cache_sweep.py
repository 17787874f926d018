"""Round-robin timing of fused TAD at teacher_cache_mib 0, 64 and 128 next to fused forward KL and
torchtune's chunked forward KL, all in one process (CPU, (2048, 32000, 512), fp32, default chunk).

    python benchmarks/cache_sweep.py [REPEATS]

Prints a markdown table: median step time (forward + backward) per case, its ratio to torchtune's
chunked forward KL and to our fused forward KL in the same mode (eager or compiled chunks), each
the median over rounds of the ratio within a round.
"""

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loss_bench as lb  # noqa: E402


def main(repeats: int = 7, warmup: int = 2) -> None:
    inputs = lb.make_inputs(2048, 32000, 512, torch.float32, "cpu")
    cases = {
        "torchtune_chunked FKL": lb.make_step("torchtune_chunked", "forward_kl", *inputs),
        "fused FKL": lb.make_step("fused", "forward_kl", *inputs),
        "fused_compiled FKL": lb.make_step("fused_compiled", "forward_kl", *inputs),
    }
    for mib in (0, 64, 128):
        cases[f"fused TAD cache {mib}"] = lb.make_step("fused", "tad", *inputs,
                                                       teacher_cache_mib=mib)
        cases[f"fused_compiled TAD cache {mib}"] = lb.make_step("fused_compiled", "tad", *inputs,
                                                                teacher_cache_mib=mib)
    times, _ = lb.time_round_robin(cases, inputs, "cpu", warmup, repeats)
    print(f"threads={torch.get_num_threads()} warmup={warmup} repeats={repeats} "
          "(ratios: median over rounds of the ratio within a round)")
    print("| case | median ms | / torchtune chunked FKL | / fused FKL (same mode) | all times ms |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        ref = times["fused_compiled FKL" if "compiled" in name else "fused FKL"]
        print(f"| {name} | {statistics.median(values):.0f} | "
              f"{lb.paired_time_ratio(values, times['torchtune_chunked FKL']):.2f} | "
              f"{lb.paired_time_ratio(values, ref):.2f} | {' '.join(f'{x:.0f}' for x in values)} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
