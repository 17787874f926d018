"""The recipe at commit 917be50 (before the overhead work) against a minimal loop over the same
models, stepping alternately in one process, as ``recipe_bench.py`` does for the current recipe:
the "before" of benchmarks/RESULTS.md. The recipe's step is that commit's train loop body,
verbatim. Run it with a checkout of 917be50 and that checkout's environment:

    git worktree add /tmp/old 917be50 && (cd /tmp/old && python3 -m venv .venv && \
        .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install -e .)
    /tmp/old/.venv/bin/python benchmarks/recipe_step_before.py /tmp/old [LOG_EVERY]
"""
import importlib.resources
import statistics
import sys
import time

sys.path.insert(0, f"{sys.argv[1]}/recipes")
import torch
import tad_distill
from omegaconf import OmegaConf
from tad_torchtune.schema import validate_config, resolve_package_paths
from tad_torchtune.losses.ce import chunked_cross_entropy
from tad_torchtune.models import forward_hidden, project_logits

cfg = OmegaConf.load(str(importlib.resources.files("tad_torchtune.configs") / "demo.yaml"))
cfg.output_dir = "/tmp/before_bench"; cfg.eval_every_n_steps = None; cfg.save_every_n_steps = None
cfg.export_hf = False; cfg.log_every_n_steps = int(sys.argv[2]) if len(sys.argv) > 2 else 1
validate_config(cfg); resolve_package_paths(cfg)
r = tad_distill.TADDistillRecipe(cfg); r.setup(cfg)
r._optimizer.zero_grad(set_to_none=True)
r._train_sampler.set_position(0, 0)
batches, spare = iter(r._train_loader), iter(r._train_loader)

def recipe_step():  # the old train loop's body
    t0 = time.perf_counter()
    micro = [r._to_device(r._shift_labels(next(batches))) for _ in range(r._grad_accum)]
    log = r._train_step(micro)
    r.global_step += 1
    r.step_in_epoch += 1
    r.tokens_seen += int(log["step_tokens"])
    log["tokens_per_second"] = log["step_tokens"] / (time.perf_counter() - t0)
    if r.global_step % r._log_every == 0:
        r._log(log)

def minimal_step():
    b = r._shift_labels(next(spare))
    tokens, labels = b["tokens"], b["labels"]
    n = (labels != -100).sum()
    with torch.no_grad():
        tl = project_logits(r._teacher, forward_hidden(r._teacher, tokens)[0])
    logits = project_logits(r._student, forward_hidden(r._student, tokens)[0])
    ce, _ = chunked_cross_entropy(logits, labels, chunk_size=r._loss_chunk_size)
    loss = ce + r._kd_sum_and_count(logits, tl, labels).total
    (loss / n).backward()
    torch.nn.utils.clip_grad_norm_([p for p in r._step_module.parameters() if p.requires_grad], 1.0)
    r._optimizer.step(); r._optimizer.zero_grad(set_to_none=True)

for _ in range(3):
    recipe_step(); minimal_step()
rec, mini = [], []
for _ in range(40):
    t0 = time.perf_counter(); recipe_step(); rec.append(time.perf_counter() - t0)
    t0 = time.perf_counter(); minimal_step(); mini.append(time.perf_counter() - t0)
tok = 8 * 127
print(f"recipe {tok / statistics.median(rec):.0f} tok/s, minimal {tok / statistics.median(mini):.0f}, "
      f"recipe/minimal {statistics.median(m / x for x, m in zip(rec, mini)):.3f}")
