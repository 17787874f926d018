"""End-to-end tests of ``tune run tad_distill`` on tiny models made inside the tests."""

import json
import math
import os
import signal
import subprocess
import time
import warnings
import weakref
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import tune

GOLDEN = Path(__file__).parents[1] / "assets" / "golden_loss_trace.json"


@pytest.fixture(scope="module")
def baseline(assets, tmp_path_factory):
    """The reference run: 10 steps, fp32, batch 8, one process, a checkpoint every 2 steps."""
    out = tmp_path_factory.mktemp("baseline") / "out"
    cfg = tune.base_config(assets, out, save_every_n_steps=2, eval_every_n_steps=5)
    tune.run_tune(["tad_distill", "--config", str(tune.write_config(cfg, out.parent / "c.yaml"))],
                  cwd=out.parent)
    return out


def _run(assets, tmp_path, name, nproc=1, **overrides) -> Path:
    """A run of the tiny config: in this process (``tune.run_recipe``), or through ``tune run``
    on ``nproc`` processes, or when it compiles (dynamo's state stays in its own process)."""
    out = tmp_path / name
    out.mkdir(parents=True, exist_ok=True)
    cfg = tune.base_config(assets, out, **overrides)
    if nproc == 1 and not cfg.get("compile"):
        tune.run_recipe("tad_distill", cfg)
    else:
        tune.run_tune(["tad_distill", "--config", str(tune.write_config(cfg, out / "c.yaml"))],
                      cwd=tmp_path, nproc=nproc)
    return out


def _assert_same_losses(a: dict[int, float], b: dict[int, float], rtol: float, steps=None):
    steps = sorted(b) if steps is None else steps
    assert steps and all(s in a for s in steps), (sorted(a), steps)
    for s in steps:
        assert math.isclose(a[s], b[s], rel_tol=rtol, abs_tol=0.0), (s, a[s], b[s])


def test_golden_loss_trace(baseline):
    """`tune run` from a folder outside the checkout; the fp32 trace equals the recorded one."""
    losses = tune.train_losses(baseline)
    assert sorted(losses) == list(range(1, 11))
    golden = {int(k): v for k, v in json.loads(GOLDEN.read_text())["loss"].items()}
    _assert_same_losses(losses, golden, rtol=1e-5)
    # The loss decreases on this tiny problem (the recipe learns).
    assert losses[10] < losses[1] - 0.5


def test_outputs_logged_and_exported(assets, baseline):
    records = tune.read_metrics(baseline)
    train = [r for r in records if "loss" in r]
    for key in ("ce", "kd_loss", "lr", "grad_norm", "tokens_per_second", "kd/tail_mass",
                "kd/abar", "kd/dkl1", "kd/dkl2", "peak_rss_gib"):
        assert all(math.isfinite(r[key]) for r in train), key
    # `tokens` counts valid tokens seen so far, `step_tokens` those of the step
    assert [r["tokens"] for r in train] == [sum(t["step_tokens"] for t in train[: i + 1])
                                            for i in range(len(train))]
    assert all(r["step_tokens"] == 8 * 31 for r in train)  # 8 blocks of 32, last label shifted out
    # loss = clm_weight * ce + kd_weight * kd
    for r in train:
        assert math.isclose(r["loss"], r["ce"] + r["kd_loss"], rel_tol=1e-9)
    val = [r for r in records if "val_kl" in r]
    assert [r["step"] for r in val] == [5, 10]
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_ce"])) for r in val)
    assert (baseline / "student" / "model.safetensors").is_file()
    assert (baseline / "student" / "config.json").is_file()
    ckpts = sorted(p.name for p in (baseline / "checkpoints").glob("step_*"))
    assert ckpts == ["step_000008", "step_000010"]  # keep_last_n_checkpoints: 2
    assert (baseline / "checkpoints" / "latest").read_text() == "step_000010"
    # both exports encode text as training did: the tokenizer.json adds no BOS, torchtune's
    # HuggingFaceBaseTokenizer prepends <|bos|> (id 0), and so does AutoTokenizer on the export
    from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer
    from transformers import AutoTokenizer

    trained_with = HuggingFaceBaseTokenizer(
        str(assets["tokenizer"] / "tokenizer.json"),
        tokenizer_config_json_path=str(assets["tokenizer"] / "tokenizer_config.json"))
    texts = [json.loads(line)["text"] for line in tune.CORPUS.read_text().splitlines()[:3]]
    for export in (baseline / "student", baseline / "checkpoints" / "step_000010" / "hf"):
        hf_tok = AutoTokenizer.from_pretrained(export)
        for text in texts:
            ids = hf_tok(text)["input_ids"]
            assert ids[0] == 0 and ids == trained_with.encode(text, add_eos=False), export
    # the profiler is off unless asked for: no trace, no profile metric
    assert not (baseline / "profiling_outputs").exists()
    assert not any(k.startswith("profile_") for r in records for k in r)


def test_validation_metrics_equal_tad_eval_on_the_exported_student(assets, baseline, tmp_path,
                                                                   monkeypatch):
    """The recipe's validation and ``tad_eval`` share one metric implementation: val_kl / val_ce
    of the final step equal tad_eval's KL and CE for the exported student on the same text."""
    cfg = tune.base_config(assets, baseline)
    out = tmp_path / "eval"
    eval_cfg = {
        "output_dir": str(out), "device": "cpu", "dtype": "fp32", "batch_size": 3,
        "chunk_size": 1024, "tokenizer": cfg["tokenizer"], "dataset": cfg["validation_dataset"],
        "teacher": {"checkpoint_dir": cfg["teacher_checkpointer"]["checkpoint_dir"]},
        "students": {"s": {"checkpoint_dir": str(baseline / "student")}},
    }
    # tad_eval in this process (its `tune run`: tests/recipes/test_tad_eval.py)
    tune.run_in_process("tad_eval", ["--config", str(tune.write_config(eval_cfg, tmp_path / "e.yaml"))],
                        monkeypatch)
    report = json.loads((out / "eval.json").read_text())["students"]["s"]
    final = [r for r in tune.read_metrics(baseline) if "val_kl" in r][-1]
    assert final["step"] == 10
    assert report["num_tokens"] == final["val_tokens"] == 8 * 31  # what the means are over
    assert report["kl"] == pytest.approx(final["val_kl"], rel=1e-5)
    assert report["ce"] == pytest.approx(final["val_ce"], rel=1e-6)
    assert report["top1_agreement"] == pytest.approx(final["val_top1_agreement"], abs=1e-12)
    assert final["val_kl"] > 0.01


def test_gradient_accumulation_matches_large_batch(assets, tmp_path, baseline):
    out = _run(assets, tmp_path, "accum", batch_size=2, gradient_accumulation_steps=4)
    _assert_same_losses(tune.train_losses(out), tune.train_losses(baseline), rtol=1e-5)


@pytest.mark.slow
def test_two_processes_fsdp_match_one(assets, tmp_path, baseline):
    out = _run(assets, tmp_path, "fsdp", nproc=2, batch_size=4, eval_every_n_steps=5)
    _assert_same_losses(tune.train_losses(out), tune.train_losses(baseline), rtol=1e-5)
    val = {r["step"]: r["val_kl"] for r in tune.read_metrics(out) if "val_kl" in r}
    ref = {r["step"]: r["val_kl"] for r in tune.read_metrics(baseline) if "val_kl" in r}
    _assert_same_losses(val, ref, rtol=1e-5)


@pytest.mark.slow
def test_a_validation_set_smaller_than_the_processes(assets, tmp_path):
    """One held-out block on two processes: the rank without a block of its own runs the
    other's FSDP steps on a padding batch that counts nothing (before, it ran none, and the
    ranks' collectives no longer matched), so the held-out figures are one process's."""
    one_block = {"validation_dataset.max_blocks": 1, "max_steps": 1, "export_hf": False}
    one = _run(assets, tmp_path, "one", **one_block)
    out = tmp_path / "two"
    out.mkdir()
    cfg = tune.base_config(assets, out, **one_block)
    tune.run_tune(["tad_distill", "--config", str(tune.write_config(cfg, out / "c.yaml"))],
                  cwd=tmp_path, nproc=2, timeout=180)
    (ref,) = [r for r in tune.read_metrics(one) if "val_kl" in r]
    (got,) = [r for r in tune.read_metrics(out) if "val_kl" in r]
    for key in ("val_kl", "val_ce"):
        assert got[key] == pytest.approx(ref[key], rel=1e-5), (key, got, ref)


def test_a_checkpoint_slower_than_torchruns_grace_is_told_once(monkeypatch, capsys):
    """torchrun kills the processes some seconds after it passes a SIGTERM on: a checkpoint
    slower than that is told once, by rank 0, with the remedy this torch has."""
    import types

    import tad_distill

    warn = tad_distill.TADDistillRecipe._warn_if_preemption_cannot_save

    class SimpleNamespace(types.SimpleNamespace):  # a recipe's state, with its _warn
        _warn = tad_distill.TADDistillRecipe._warn
    for settable, remedy in ((True, "set TORCH_ELASTIC_SHUTDOWN_TIMEOUT to 91 or more"),
                             (False, "this torch's torchrun cannot wait longer")):
        monkeypatch.setattr(tad_distill, "preemption_grace_s", lambda: 30)
        monkeypatch.setattr(tad_distill, "shutdown_timeout_settable", lambda: settable)
        rank0 = SimpleNamespace(_is_rank_zero=True, _warned_slow_save=False, global_step=7)
        for seconds in (29.0, 45.2, 50.0):  # the first is within the grace
            warn(rank0, seconds)
        warn(SimpleNamespace(_is_rank_zero=False, _warned_slow_save=False, global_step=7), 45.2)
        assert capsys.readouterr().err == (
            "tad_distill: warning: the checkpoint of step 7 took 45 s; torchrun kills the "
            "processes 30 s after it passes a SIGTERM on, so a preempted run would resume from "
            f"the checkpoint before; {remedy}\n")
    monkeypatch.setattr(tad_distill, "preemption_grace_s", lambda: None)  # no torchrun
    warn(SimpleNamespace(_is_rank_zero=True, _warned_slow_save=False, global_step=7), 1e6)
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_torchruns_grace_reaches_the_processes(assets, tmp_path):
    """Under torchrun the processes read the grace from TORCH_ELASTIC_SHUTDOWN_TIMEOUT (here
    0: every checkpoint is slower) where this torch's agent takes it, and say so once in two
    checkpoints; elsewhere the grace is torchrun's fixed 30 s, which these do not reach."""
    from tad_torchtune.parallel import shutdown_timeout_settable

    out = tmp_path / "out"
    out.mkdir()
    cfg = tune.base_config(assets, out, batch_size=4, max_steps=2, save_every_n_steps=1,
                           export_hf=False, validation_dataset=None)
    proc = tune.run_tune(["tad_distill", "--config", str(tune.write_config(cfg, out / "c.yaml"))],
                         cwd=tmp_path, nproc=2, env={"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "0"})
    warnings = [line for line in proc.stderr.splitlines() if "tad_distill: warning:" in line]
    assert len(warnings) == int(shutdown_timeout_settable()), proc.stderr[-3000:]
    assert all(w.startswith("tad_distill: warning: the checkpoint of step 1 took ") and
               "torchrun kills the processes 0 s after" in w for w in warnings), warnings


@pytest.mark.slow
def test_fused_head_on_two_processes_matches_one(assets, tmp_path, baseline):
    """The StudentHead is the FSDP2 root of the student: its output weight is gathered while the
    fused head reads the weight itself (and during evaluate), so 2 processes train as 1."""
    out = _run(assets, tmp_path, "fsdp_fused", nproc=2, batch_size=4, fused=True,
               eval_every_n_steps=5)
    _assert_same_losses(tune.train_losses(out), tune.train_losses(baseline), rtol=1e-5)
    val = {r["step"]: r["val_kl"] for r in tune.read_metrics(out) if "val_kl" in r}
    ref = {r["step"]: r["val_kl"] for r in tune.read_metrics(baseline) if "val_kl" in r}
    _assert_same_losses(val, ref, rtol=1e-5)


def _kill_after_checkpoint(cmd: list[str], cwd: Path, out: Path, min_step: int) -> int:
    """Start a run, SIGKILL it once a checkpoint of step >= min_step is complete; return that
    checkpoint's step."""
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env, start_new_session=True)
    pointer = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline:
        if pointer.is_file() and int(pointer.read_text().split("_")[1]) >= min_step:
            break
        if proc.poll() is not None:
            raise AssertionError(f"run ended before it could be killed: {proc.stderr.read()[-3000:]}")
        time.sleep(0.02)
    import os

    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return int(pointer.read_text().split("_")[1])


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_losses(assets, tmp_path, baseline):
    out = tmp_path / "killed"
    out.mkdir()
    cfg = tune.base_config(assets, out, save_every_n_steps=2, eval_every_n_steps=5)
    path = tune.write_config(cfg, out / "c.yaml")
    step = _kill_after_checkpoint([tune.tune_bin(), "run", "tad_distill", "--config", str(path)],
                                  tmp_path, out, min_step=4)
    assert step < 10, "the run finished before the kill"
    logged = [r["step"] for r in tune.read_metrics(out) if "loss" in r]
    assert logged and max(logged) >= step, logged
    with open(out / "metrics.jsonl", "a") as f:  # a line the kill cut short
        f.write('{"step": 9, "tokens": 1')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tune.run_recipe("tad_distill", {**cfg, "resume_from_checkpoint": True})  # in this process
    noise = [str(w.message) for w in caught if "learning rate" in str(w.message)
             or "torch.distributed is disabled" in str(w.message)]
    assert not noise, noise  # a one-process resume says nothing it need not
    # The records the killed run logged after its checkpoint were dropped at the resume, which
    # logged those steps again: one record per step, as the uninterrupted run's.
    rows = tune.read_metrics(out)
    assert [r["step"] for r in rows] == [r["step"] for r in tune.read_metrics(baseline)]
    assert [sorted(r) for r in rows] == [sorted(r) for r in tune.read_metrics(baseline)]
    # the training time goes on from the checkpoint's: it grows step after step over the resume
    seconds = [r["train_seconds"] for r in rows if "loss" in r]
    assert all(a < b for a, b in zip(seconds, seconds[1:])), seconds
    _assert_same_losses(tune.train_losses(out), tune.train_losses(baseline), rtol=1e-6,
                        steps=list(range(step + 1, 11)))


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_saves_the_step_and_the_resume_continues(assets, tmp_path, baseline, nproc):
    """SIGTERM (a scheduler's preemption) mid-run: the run saves its state after the step it is
    in (every process after the same step: the request travels in the step's all-reduce; under
    torchrun the agent passes the signal on), exits 143, and the resume logs the losses the
    uninterrupted run logged. No periodic checkpoint falls in between (save_every 50)."""
    out = tmp_path / "stopped"
    out.mkdir()
    # the baseline's global batch of 8 on either number of processes; resumed on one
    cfg = tune.base_config(assets, out, save_every_n_steps=50, eval_every_n_steps=5,
                           batch_size=8 // nproc)
    launch = [tune.tune_bin(), "run", *(["--nproc_per_node", "2"] if nproc > 1 else []),
              "tad_distill", "--config", str(tune.write_config(cfg, out / "c.yaml"))]
    proc = subprocess.Popen(launch, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and not any(
            "loss" in r and r["step"] >= 2 for r in _metrics_so_far(out)):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    # one process: 143, as SIGTERM's default; torchrun's agent ends with its own status and
    # traceback (SignalException) once its workers have stopped
    assert proc.returncode == 143 if nproc == 1 else proc.returncode != 0, err[-3000:]
    pointer = out / "checkpoints" / "latest"
    step = int(pointer.read_text().split("_")[1])
    assert 2 <= step < 10, (step, err[-3000:])
    assert (f"tad_distill: SIGTERM: stopped after step {step}, its state saved in "
            f"{out / 'checkpoints' / pointer.read_text()}") in err, err[-3000:]
    assert nproc > 1 or "Traceback" not in err, err[-3000:]
    assert not (out / "student").exists()  # no export of a stopped run
    tune.run_recipe("tad_distill", {**cfg, "resume_from_checkpoint": True, "batch_size": 8})
    _assert_same_losses(tune.train_losses(out), tune.train_losses(baseline), rtol=1e-5,
                        steps=list(range(step + 1, 11)))


def _metrics_so_far(out: Path) -> list[dict]:
    """The records of a running run's metrics file (a line it is writing is left out)."""
    path = out / "metrics.jsonl"
    rows = []
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


@pytest.mark.slow
def test_resume_on_two_processes_from_one_process_checkpoint(assets, tmp_path, baseline):
    out = tmp_path / "reshard"
    out.mkdir()
    cfg = tune.base_config(assets, out, save_every_n_steps=2, eval_every_n_steps=5)
    path = tune.write_config(cfg, out / "c.yaml")
    step = _kill_after_checkpoint([tune.tune_bin(), "run", "tad_distill", "--config", str(path)],
                                  tmp_path, out, min_step=4)
    tune.run_tune(["tad_distill", "--config", str(path), "resume_from_checkpoint=True",
                   "batch_size=4"], cwd=tmp_path, nproc=2)
    _assert_same_losses(tune.train_losses(out), tune.train_losses(baseline), rtol=1e-5,
                        steps=list(range(step + 1, 11)))


@pytest.mark.slow
def test_compile_and_activation_checkpointing_match_eager(assets, tmp_path, baseline):
    ac = _run(assets, tmp_path, "ac", enable_activation_checkpointing=True)
    # Recomputation replays the same float operations: identical losses.
    _assert_same_losses(tune.train_losses(ac), tune.train_losses(baseline), rtol=1e-7)
    both = _run(assets, tmp_path, "compiled", enable_activation_checkpointing=True, compile=True,
                max_steps=10, profiler={"enabled": True, "wait_steps": 6, "warmup_steps": 1,
                                        "active_steps": 1, "num_cycles": 1})
    # Inductor fuses and reorders float32 reductions: equal to eager within 1e-4 relative.
    _assert_same_losses(tune.train_losses(both), tune.train_losses(baseline), rtol=1e-4)
    # the profiled step (the 8th) reads the compiled graphs' C++ kernels, which a CPU's profile
    # does not record, from the calls of the graphs (profiling.CPU_COMPILED)
    (m,) = [r for r in tune.read_metrics(both) if "profile_step_ms" in r]
    assert m["step"] == 8 and m["profile_inductor_ms"] > 0, m
    assert 0 < m["profile_busy_ms"] <= m["profile_step_ms"]


# ------------------------------------------------------------------ in-process: NaN, export


def _recipe(cfg: dict):
    import tad_distill
    from tad_torchtune.schema import validate_config

    conf = OmegaConf.create(cfg)
    validate_config(conf)
    recipe = tad_distill.TADDistillRecipe(conf)
    recipe.setup(conf)
    return recipe


@pytest.mark.parametrize("flag,cache_mib", [(None, 3), (False, None)])
def test_fused_options_reach_the_fused_path(assets, tmp_path, monkeypatch, flag, cache_mib):
    """fused_teacher_cache_mib (null: a row's teacher projections) and fused_float32_weight_grad
    (default true) are what the recipe hands the fused head (values only bf16 changes:
    tests/losses/test_fused.py)."""
    import tad_torchtune.head as head_module

    calls = []
    real = head_module.fused_head

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(head_module, "fused_head", spy)
    extra = {} if flag is None else {"fused_float32_weight_grad": flag}
    cfg = tune.base_config(assets, tmp_path / "out", fused=True, fused_teacher_cache_mib=cache_mib,
                           max_steps=1, export_hf=False, **extra)
    recipe = _recipe(cfg)
    recipe.train()
    want = None if cache_mib is None else float(cache_mib)
    assert calls and all(c["teacher_cache_mib"] == want for c in calls)
    assert all(c["float32_weight_grad"] is (flag is None) for c in calls)


@pytest.mark.parametrize("fused", [False, True])
def test_a_micro_batch_s_teacher_output_is_freed_before_the_next_teacher_forward(
        assets, tmp_path, fused):
    """The teacher's output of one micro-batch (its hidden states; unfused, its whole
    ``[B, T, V]`` logits) is gone when the next micro-batch's teacher forward starts and when
    the optimizer steps: no step holds two of them at its peak."""
    cfg = tune.base_config(assets, tmp_path / "out", fused=fused, max_steps=2,
                           gradient_accumulation_steps=3, export_hf=False)
    recipe = _recipe(cfg)
    alive, checked = [], []

    def freed(where):
        assert all(ref() is None for ref in alive), f"a teacher output is alive at {where}"
        checked.append(where)

    real_teacher = recipe._teacher_head

    def teacher(*args, **kwargs):
        freed("a teacher forward")
        out = real_teacher(*args, **kwargs)
        alive.extend(weakref.ref(t) for t in (out.hidden, out.logits) if t is not None)
        return out

    recipe._teacher_head = teacher
    recipe._optimizer.register_step_pre_hook(lambda *_: freed("the optimizer step"))
    recipe.train()
    assert checked.count("a teacher forward") >= 6 and "the optimizer step" in checked
    assert len(alive) >= (6 if fused else 12)  # hidden states, and logits when unfused


def test_mfu_and_per_device_throughput_are_logged(assets, tmp_path):
    """mfu = model FLOPs of the step's processed positions / seconds / peak_flops_per_device,
    with the step's seconds those of tokens_per_second."""
    from tad_torchtune.flops import step_flops_per_token

    out = tmp_path / "mfu"
    recipe = _recipe(tune.base_config(assets, out, max_steps=2, export_hf=False,
                                      peak_flops_per_device=1e12))
    recipe.train()
    rows = [r for r in tune.read_metrics(out) if "loss" in r]
    per_token = step_flops_per_token(recipe._student, recipe._teacher, 32)
    total = 0.0
    for r in rows:
        seconds = r["step_tokens"] / r["tokens_per_second"]
        assert r["mfu"] == pytest.approx(per_token * 8 * 32 / seconds / 1e12, rel=1e-9)
        assert r["tokens_per_second_per_device"] == r["tokens_per_second"]
        total += seconds  # train_seconds: the steps' seconds so far (to the ms)
        assert r["train_seconds"] == pytest.approx(total, abs=1e-3)
    # no peak known (a CPU, no key): no mfu
    plain = tmp_path / "plain"
    _recipe(tune.base_config(assets, plain, max_steps=1, export_hf=False)).train()
    assert "mfu" not in tune.read_metrics(plain)[0]


def test_the_profiler_key_profiles_a_cycle_as_torchtune_does(assets, tmp_path, capsys):
    """``profiler`` is torchtune's key (no ``_component_`` needed): the cycle's trace and key
    averages where torchtune writes them, and on the step that ends the cycle its metrics, per
    active step. On a CPU the kernels are the outermost aten ops of one thread: they lie within
    the steps and do not overlap, so their kinds add up to the busy time."""
    out = _run(assets, tmp_path, "prof", max_steps=5, export_hf=False,
               profiler={"enabled": True, "wait_steps": 1, "warmup_steps": 1,
                         "active_steps": 2, "num_cycles": 1})
    cycle = out / "profiling_outputs" / "iteration_4"
    assert (cycle / "rank0_key_averages.txt").is_file()
    assert len(list(cycle.glob("*.pt.trace.json.gz"))) == 1
    profiled = [r for r in tune.read_metrics(out) if "profile_step_ms" in r]
    assert [r["step"] for r in profiled] == [4]  # wait 1 + warmup 1 + active 2
    (m,) = profiled
    assert 0 < m["profile_busy_ms"] <= m["profile_step_ms"]
    assert m["profile_busy_share"] == pytest.approx(m["profile_busy_ms"] / m["profile_step_ms"])
    kinds = {k: v for k, v in m.items() if k.endswith("_ms") and k not in (
        "profile_step_ms", "profile_busy_ms")}
    assert sum(kinds.values()) == pytest.approx(m["profile_busy_ms"], rel=1e-6)
    assert kinds["profile_matmul_ms"] > 0 and kinds["profile_attention_ms"] > 0
    # the 8 x 32 tokens' step: fewer kernels than a hundred would be a cycle of nothing
    assert m["profile_kernels"] > 100
    assert "tad_distill: step 4 profiled: " in capsys.readouterr().out
    # a cycle the run's end cuts short (active steps 3-5 of a 4-step run) is read at the end,
    # per step it recorded: as many kernels a step as the whole cycle above
    cut = _run(assets, tmp_path, "cut", max_steps=4, export_hf=False,
               profiler={"enabled": True, "wait_steps": 1, "warmup_steps": 1,
                         "active_steps": 3, "num_cycles": 1})
    (c,) = [r for r in tune.read_metrics(cut) if "profile_step_ms" in r]
    assert c["step"] == 4 and c["profile_kernels"] == m["profile_kernels"]


def test_resume_on_another_token_store_is_refused_naming_both(assets, tmp_path):
    """The store's fingerprint is saved with each checkpoint; a resume on another store (here:
    another corpus) names both fingerprints and the key that forces it."""
    out = tmp_path / "data"
    cfg = tune.base_config(assets, out, max_steps=2, save_every_n_steps=2, export_hf=False)
    first = _recipe(cfg)
    first.train()
    saved = first._data_fingerprints["dataset"]
    other = tmp_path / "other.jsonl"
    lines = tune.CORPUS.read_text().splitlines()
    other.write_text("\n".join(reversed(lines)) + "\n")
    moved = {**cfg, "resume_from_checkpoint": True, "max_steps": 3,
             "dataset": {**cfg["dataset"], "source": str(other)},
             "validation_dataset": {**cfg["validation_dataset"], "source": str(other)}}
    from tad_torchtune.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        _recipe(moved)
    now = err.value.args[0].split("this run's is ")[1].split(" ")[0]
    assert now != saved and len(now) >= 16
    assert str(err.value) == (
        f"dataset: the checkpoint {str(out / 'checkpoints' / 'step_000002')!r} was trained on "
        f"the token store {saved} and this run's is {now} (other data or another tokenizer); "
        f"resume_on_different_data=true resumes anyway")
    forced = _recipe({**moved, "resume_on_different_data": True})
    assert forced.global_step == 2


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_resume_past_a_damaged_newest_checkpoint_keeps_the_metrics_before_it(
        assets, tmp_path, capsys, damage):
    """The newest checkpoint gone or cut short: the resume takes the one before, says in one
    line which it passed over and why, and keeps the records up to it (before: a folder gone
    started the run from scratch, dropping every record; a file cut short, a traceback)."""
    import shutil

    out = tmp_path / damage
    cfg = tune.base_config(assets, out, max_steps=4, save_every_n_steps=2, export_hf=False,
                           validation_dataset=None)
    _recipe(cfg).train()
    newest = out / "checkpoints" / "step_000004"
    if damage == "deleted":
        shutil.rmtree(newest)
        why = "latest names it, but it does not exist"
    else:
        size = (newest / "__0_0.distcp").stat().st_size
        with open(newest / "__0_0.distcp", "r+b") as f:
            f.truncate(1000)
        why = f"its __0_0.distcp has 1000 bytes, its tensors need {size} (truncated)"
    capsys.readouterr()
    assert _recipe({**cfg, "resume_from_checkpoint": True}).global_step == 2
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "warning" in line] == [
        f"tad_distill: warning: resume_from_checkpoint: skipped {str(newest)!r}: {why}"]
    assert f"resumed from {out / 'checkpoints' / 'step_000002'} at step 2" in err
    assert [r["step"] for r in tune.read_metrics(out)] == [1, 2]


CHANGED = [  # resumed with another student or optimizer -> the first difference, the key
    ("student_model.intermediate_dim=40",
     "step_000001's model.student.layers.0.mlp.w1.weight is [48, 32], this run's [40, 32] "
     "(and 5 other differences): student_model"),
    ("student_model.num_layers=3",
     "step_000001 has no model.student.layers.2.attn.q_proj.weight, which this run's "
     "student_model has (and 8 other differences): student_model"),
    ("optimizer._component_=torch.optim.SGD",
     "step_000001 has no optim.param_groups.0.momentum, which this run's optimizer has (and "
     "64 other differences): optimizer"),
]


@pytest.mark.parametrize("override,message", CHANGED, ids=[c[0].split("=")[0] for c in CHANGED])
def test_a_resume_with_another_student_or_optimizer_is_one_line(assets, tmp_path, override,
                                                                message, monkeypatch, capsys):
    """Refused before anything is loaded, naming the first difference and the key (before: a
    traceback from dcp.load), and not by falling back to an older checkpoint: it is the
    config that differs, not the files."""
    cfg = tune.base_config(assets, tmp_path / "out", max_steps=1, save_every_n_steps=1,
                           export_hf=False, validation_dataset=None)
    _recipe(cfg).train()
    line = tune.user_error("tad_distill", [
        "--config", str(tune.write_config(cfg, tmp_path / "c.yaml")),
        "resume_from_checkpoint=true", override], monkeypatch, capsys)
    key = message.rsplit(" ", 1)[1]
    assert line == (f"tad_distill: error: resume_from_checkpoint: {message} differs from the "
                    f"checkpoint's run; resume with its {key}, or start over in another "
                    f"output_dir")


def test_a_finished_run_resumed_logs_its_last_validation_once(assets, tmp_path):
    """A last step off the validation period is validated after the training, here after its
    checkpoint: a resume from that checkpoint (a finished run resumed again, or one killed in
    its export) kept the record and logged the validation again; one record per step."""
    out = tmp_path / "again"
    cfg = tune.base_config(assets, out, max_steps=3, eval_every_n_steps=2,
                           save_every_n_steps=3, export_hf=False)
    _recipe(cfg).train()
    records = tune.read_metrics(out)
    assert [r["step"] for r in records if "val_kl" in r] == [2, 3]
    _recipe({**cfg, "resume_from_checkpoint": True}).train()
    assert tune.read_metrics(out) == records


def test_a_finished_run_resumed_does_not_rewrite_its_last_checkpoint(assets, tmp_path):
    """A last step off the save period is saved at the end; a resume from it trains nothing
    and leaves that checkpoint as it is (before, it wrote it again, replacing the folder: a
    kill then could leave latest naming a folder being replaced)."""
    out = tmp_path / "again"
    cfg = tune.base_config(assets, out, max_steps=3, save_every_n_steps=2, export_hf=False)
    _recipe(cfg).train()
    last = out / "checkpoints" / "step_000003"
    before = (last.stat().st_ino, (last / ".metadata").stat().st_mtime_ns)
    recipe = _recipe({**cfg, "resume_from_checkpoint": True})
    recipe.train()
    assert recipe.global_step == 3
    assert (last.stat().st_ino, (last / ".metadata").stat().st_mtime_ns) == before


def test_a_second_run_in_a_folder_in_use_is_refused(assets, tmp_path):
    """A run in an ``output_dir`` another process's run holds (a resume started while an
    earlier run's processes, orphaned by a killed launcher, still train) is one line naming
    the holder; once that process is gone the run goes ahead. Before, both trained in the folder
    and one deleted the other's checkpoint in the writing."""
    import subprocess
    import sys

    from tad_torchtune.errors import ConfigError

    out = tmp_path / "shared"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from tad_torchtune.files import hold_lock; "
         f"f = hold_lock(Path({str(out / '.tad_distill.lock')!r})); print('held', flush=True); "
         "time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        cfg = tune.base_config(assets, out, max_steps=1, export_hf=False)
        with pytest.raises(ConfigError) as err:
            _recipe(cfg)
        assert str(err.value) == (
            f"output_dir: {str(out)!r} is in use by another tad_distill run (process "
            f"{holder.pid}); wait for it to end or stop it (SIGTERM saves its state), or choose "
            f"another output_dir")
        assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    recipe = _recipe(cfg)
    recipe.train()
    recipe.cleanup()
    _recipe({**cfg, "resume_from_checkpoint": True})  # the same process: not a conflict


def test_a_run_whose_launcher_died_stops_with_its_state_saved(assets, tmp_path, capsys):
    """Under torchrun a killed launcher leaves its processes training, orphaned (sessions of
    their own): a process whose launcher is gone stops after its step and saves, as on
    SIGTERM, instead of training on beside a resume."""
    import tad_distill

    out = tmp_path / "orphan"
    recipe = _recipe(tune.base_config(assets, out, max_steps=4, save_every_n_steps=4,
                                      export_hf=False))
    recipe._launcher = -1  # not this process's parent: the launcher is gone
    with pytest.raises(tad_distill.Stopped) as stopped:
        recipe.train()
    assert stopped.value.step == 1 and stopped.value.checkpoint == out / "checkpoints" / (
        "step_000001")
    assert ("tad_distill: rank 0: the launcher (process -1) is gone: stopping after this step, "
            "its state saved") in capsys.readouterr().err.splitlines()


def test_a_run_from_scratch_in_an_earlier_runs_folder_is_refused(assets, tmp_path, capsys):
    """A restart that forgot resume_from_checkpoint would delete the earlier run's checkpoints
    and metrics; it is refused before anything is written, naming the way on."""
    from tad_torchtune.errors import ConfigError

    out = tmp_path / "again"
    cfg = tune.base_config(assets, out, max_steps=3, save_every_n_steps=1, export_hf=False)
    _recipe(cfg).train()
    metrics = (out / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError) as err:
        _recipe({**cfg, "max_steps": 1})
    assert str(err.value) == (
        f"output_dir: {str(out)!r} holds an earlier run's checkpoints (the newest: step_000003); "
        f"resume_from_checkpoint=true continues it; to start over, delete "
        f"{str(out / 'checkpoints')!r} or choose another output_dir")
    assert (out / "metrics.jsonl").read_text() == metrics
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "latest", "step_000002", "step_000003"]


def test_swapping_the_loss_in_one_argument_leaves_out_the_old_losss_keys(assets, tmp_path,
                                                                          capsys):
    """The README's swap (``kd_loss._component_=...ForwardKLLoss`` on a TAD config) keeps the
    config file's k and beta, which ForwardKLLoss does not take: they are left out with a
    warning (before, the run stopped on 'kd_loss.k: not an argument'); a typo still stops it."""
    from tad_torchtune.errors import ConfigError
    from tad_torchtune.losses import ForwardKLLoss

    cfg = tune.base_config(assets, tmp_path / "swap", max_steps=1)
    cfg["kd_loss"] = {**cfg["kd_loss"], "_component_": "tad_torchtune.losses.ForwardKLLoss"}
    capsys.readouterr()
    recipe = _recipe(cfg)
    assert type(recipe._head.kd_loss) is ForwardKLLoss
    assert (  # among the lines: a worker that runs this first builds the token store first
        "tad_distill: warning: kd_loss: k, beta left out: tad_torchtune.losses.ForwardKLLoss "
        "takes no such argument (another divergence's, left by swapping the loss)"
    ) in capsys.readouterr().err.splitlines()
    cfg["kd_loss"]["kk"] = 3
    with pytest.raises(ConfigError, match="^kd_loss.kk: not an argument of "
                                          "tad_torchtune.losses.ForwardKLLoss"):
        _recipe({**cfg, "output_dir": str(tmp_path / "typo")})


def test_a_swapped_loss_resumed_is_the_same_loss(assets, tmp_path, capsys):
    """A run of the swapped loss (the config file's k and beta left out) resumed with the same
    divergence written without them: the checkpoint records the divergence as built, so no
    'kd_loss differs' warning (before, one, naming the k and beta that were never used)."""
    out = tmp_path / "swapped"
    cfg = tune.base_config(assets, out, max_steps=1, save_every_n_steps=1, export_hf=False)
    cfg["kd_loss"] = {**cfg["kd_loss"], "_component_": "tad_torchtune.losses.ForwardKLLoss"}
    _recipe(cfg).train()
    capsys.readouterr()
    _recipe({**cfg, "resume_from_checkpoint": True, "max_steps": 2,
             "kd_loss": {"_component_": "tad_torchtune.losses.ForwardKLLoss"}})
    assert "kd_loss" not in capsys.readouterr().err


def test_a_loss_s_other_ignore_index_is_refused(assets, tmp_path):
    """The labels mark the positions that do not count with -100: a loss told another
    ``ignore_index`` counted them (TAD's value +0.5%, silently) or indexed with -100 (the fused
    head, DRKL: a traceback); now one line."""
    from tad_torchtune.errors import ConfigError

    cfg = tune.base_config(assets, tmp_path / "ignore", max_steps=1)
    for key, extra in (("kd_loss", {}), ("hidden_loss", {"hidden_weight": 0.5})):
        bad = {**cfg, **extra, key: {**cfg.get(key, {"_component_":
                                                     "tad_torchtune.losses.HiddenCosineLoss"}),
                                     "ignore_index": -1}}
        with pytest.raises(ConfigError) as err:
            _recipe(bad)
        assert str(err.value) == (f"{key}.ignore_index: -1 differs from the labels' -100, which "
                                  "mark the positions that do not count; accepted: -100")


def test_hidden_layers_without_a_hidden_loss_are_unused_and_said(assets, tmp_path, capsys):
    """``hidden_layers`` with ``hidden_weight: 0``: one warning line, and the teacher keeps no
    hidden state (before, a pair naming a layer the models lack stopped the first step with a
    KeyError traceback)."""
    cfg = tune.base_config(assets, tmp_path / "hidden", max_steps=1, export_hf=False,
                           hidden_weight=0.0, hidden_layers=[[7, 9]])
    capsys.readouterr()
    recipe = _recipe(cfg)
    assert ("tad_distill: warning: hidden_layers: [[7, 9]] unused: hidden_weight is 0 (no "
            "hidden loss); hidden_weight > 0 compares them") in capsys.readouterr().err.splitlines()
    assert recipe._teacher_hidden_layers == recipe._student_hidden_layers == ()
    recipe.train()
    assert recipe.global_step == 1


def test_a_refused_config_writes_nothing_and_says_one_line(assets, tmp_path, monkeypatch,
                                                           capsys):
    """A config refused by set-up's checks (a loss argument, a missing tokenizer file, a logger
    whose package is missing) leaves no output folder and prints only its line (before:
    config.yaml, logs/, "Writing logs to ..." and the seed's line came first)."""
    out = tmp_path / "new" / "out"
    cfg = tune.base_config(assets, out, max_steps=1)
    for change in ({"kd_loss": {**cfg["kd_loss"], "abar_scope": "doc"}},
                   {"tokenizer": {**cfg["tokenizer"],
                                  "tokenizer_json_path": str(tmp_path / "none.json")}},
                   {"metric_logger": {"_component_": "tests.test_errors.LoggerOfAMissingPackage",
                                      "log_dir": str(out / "logs")}}):
        path = tune.write_config({**cfg, **change}, tmp_path / "c.yaml")
        line = tune.user_error("tad_distill", ["--config", str(path)], monkeypatch, capsys)
        assert line.startswith(f"tad_distill: error: {next(iter(change))}"), line
        assert not out.exists() and (tmp_path / "new").is_dir()
    # an output folder that was there stays, with what it held
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    tune.user_error("tad_distill", ["--config", str(path)], monkeypatch, capsys)
    assert sorted(p.name for p in out.iterdir()) == [".tad_distill.lock", "notes.txt"]


def test_fused_head_keys_without_the_fused_head_are_unused_and_said(assets, tmp_path, capsys):
    """``fused_*`` keys set with ``fused: false`` (a shipped GPU config run unfused for an A/B)
    change nothing: one warning line names them; the keys left at their defaults say nothing."""
    cfg = tune.base_config(assets, tmp_path / "unfused", max_steps=1, export_hf=False,
                           fused=False, fused_float32_weight_grad=False,
                           fused_teacher_cache_mib=None)
    capsys.readouterr()
    _recipe(cfg)
    assert ("tad_distill: warning: fused_teacher_cache_mib, fused_float32_weight_grad: unused: "
            "fused is false (they set the fused head, which fused: true runs)"
            ) in capsys.readouterr().err.splitlines()
    for fused, extra in ((True, {"fused_float32_weight_grad": False}), (False, {})):
        _recipe(tune.base_config(assets, tmp_path / f"quiet_{fused}", max_steps=1,
                                 export_hf=False, fused=fused, **extra))
        assert "fused is false" not in capsys.readouterr().err


def test_a_resume_with_other_settings_says_what_it_does_with_them(assets, tmp_path, capsys):
    """The optimizer's and scheduler's states are the checkpoint's (another lr does not apply),
    the schedule follows this run's length and the loss is this run's: each change is one
    warning line (before, none was told, and config.yaml recorded the new lr)."""
    out = tmp_path / "changed"
    cfg = tune.base_config(assets, out, max_steps=2, save_every_n_steps=2, export_hf=False)
    _recipe(cfg).train()
    capsys.readouterr()
    # the same settings: nothing to tell but that the run has ended
    _recipe({**cfg, "resume_from_checkpoint": True})
    assert [line for line in capsys.readouterr().err.splitlines() if "warning" in line] == [
        "tad_distill: warning: max_steps, epochs: this run ends at step 2, at or before the "
        "checkpoint's step 2: nothing trains, and the checkpoint's student is exported"]
    changed = {**cfg, "resume_from_checkpoint": True, "max_steps": 4,
               "optimizer": {**cfg["optimizer"], "lr": 1e-4},
               "kd_loss": {**cfg["kd_loss"], "beta": 1.0}}
    recipe = _recipe(changed)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        "tad_distill: warning: optimizer: {'_component_': 'torch.optim.AdamW', 'lr': 0.0001, "
        "'weight_decay': 0.0} differs from the checkpoint's run {'_component_': "
        "'torch.optim.AdamW', 'lr': 0.003, 'weight_decay': 0.0}; its optimizer state is "
        "restored, its learning rate and hyperparameters included: this run's optimizer "
        "settings do not apply",
        "tad_distill: warning: max_steps, epochs: this run is 4 steps, the checkpoint's 2: the "
        "schedule is this run's, so the learning rate changes at step 3 (not where the "
        "checkpoint's run would have had it)",
        "tad_distill: warning: kd_loss: {'_component_': 'tad_torchtune.losses.TADLoss', 'k': 5, "
        "'beta': 1.0} differs from the checkpoint's run {'_component_': "
        "'tad_torchtune.losses.TADLoss', 'k': 5, 'beta': 2.0}: the loss (and its curve in "
        "metrics.jsonl) changes at step 3"]
    assert recipe._lr_scheduler.base_lrs == [3e-3]  # what the warning says: the checkpoint's
    # a dataset node written otherwise (the same store here; other SFT files would not be seen)
    import os

    moved = {**cfg, "resume_from_checkpoint": True,
             "dataset": {**cfg["dataset"], "store_dir": os.environ["TAD_TORCHTUNE_STORE_DIR"]}}
    _recipe(moved)
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "warning: dataset" in x]
    assert line.startswith("tad_distill: warning: dataset: {") and line.endswith(
        "}: the data position goes on over this run's samples"), line
    assert "store_dir" in line.split("differs")[0] and "store_dir" not in line.split("differs")[1]


def test_a_resume_at_or_past_the_runs_end_says_that_nothing_trains(assets, tmp_path, capsys):
    """A checkpoint of step 2 resumed with max_steps 1: one line saying that nothing trains
    and the checkpoint's student is exported (before: only the schedule's 'the learning rate
    changes at step 3', a step that never comes), and that student is exported."""
    import shutil

    from safetensors.torch import load_file

    out = tmp_path / "past"
    cfg = tune.base_config(assets, out, max_steps=2, save_every_n_steps=2, export_hf=False,
                           validation_dataset=None)
    _recipe(cfg).train()
    trained = load_file(out / "student" / "model.safetensors")
    shutil.rmtree(out / "student")
    capsys.readouterr()
    resumed = _recipe({**cfg, "resume_from_checkpoint": True, "max_steps": 1})
    assert [line for line in capsys.readouterr().err.splitlines() if "warning" in line] == [
        "tad_distill: warning: max_steps, epochs: this run ends at step 1, at or before the "
        "checkpoint's step 2: nothing trains, and the checkpoint's student is exported"]
    resumed.train()
    exported = load_file(out / "student" / "model.safetensors")
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
    assert [r["step"] for r in tune.read_metrics(out)] == [1, 2]


def test_a_validation_period_without_validation_data_is_told(assets, tmp_path, capsys):
    cfg = tune.base_config(assets, tmp_path / "noval", max_steps=1, validation_dataset=None,
                           eval_every_n_steps=1)
    capsys.readouterr()
    _recipe(cfg)
    assert (  # among the lines: a worker that runs this first builds the token store first
        "tad_distill: warning: eval_every_n_steps=1 with no validation_dataset: no validation "
        "runs (give a validation_dataset for val_kl)") in capsys.readouterr().err.splitlines()


def test_document_mask_reaches_the_models(assets, tmp_path, monkeypatch):
    """document_mask: true gives every batch the mask and positions of its documents (the
    models' side: tests/models/test_student.py), and TAD can normalise per document."""
    from tad_torchtune.data import batch as batch_module

    seen = []
    real = batch_module.document_attention

    def spy(document_ids, flex=False):
        seen.append(document_ids.clone())
        flexes.append(flex)
        return real(document_ids)  # dense: a CPU's torchtune runs no BlockMask

    flexes = []

    monkeypatch.setattr(batch_module, "document_attention", spy)
    # 64-token blocks of documents of ~580 tokens: one block in nine holds a boundary
    long_blocks = {"dataset.max_seq_len": 64, "validation_dataset.max_seq_len": 64}
    out = tmp_path / "docs"
    cfg = tune.base_config(assets, out, max_steps=10, export_hf=False, document_mask=True,
                           kd_loss={"_component_": "tad_torchtune.losses.TADLoss", "k": 5,
                                    "beta": 2.0, "abar_scope": "document"}, **long_blocks)
    _recipe(cfg).train()
    assert len(seen) >= 10 and any(int(d.max()) > 0 for d in seen)  # rows of several documents
    assert not any(flexes)  # on a CPU: the dense mask
    plain = tmp_path / "plain"
    _recipe(tune.base_config(assets, plain, max_steps=10, export_hf=False, **long_blocks)).train()
    a, b = tune.train_losses(out), tune.train_losses(plain)
    assert a[10] != pytest.approx(b[10], rel=1e-6)  # the masks changed the training

    # where both models run flex attention (CUDA, no Gemma2) the recipe asks for a BlockMask
    import tad_distill

    asked = []
    monkeypatch.setattr(tad_distill, "supports_flex_attention",
                        lambda device, *models: asked.append(models) or True)
    flexes.clear()
    flex = _recipe(tune.base_config(assets, tmp_path / "flex", max_steps=1, export_hf=False,
                                    document_mask=True, **long_blocks))
    flex.train()
    assert asked == [(flex._teacher, flex._student)] and flexes and all(flexes)


def test_packed_rows_are_document_masked_whatever_document_mask_says(assets, tmp_path):
    """torchtune's packed rows (``Batch.packed``) reach the models with their block-causal mask
    and positions with ``document_mask: false`` too; the token store's blocks only when asked."""
    from tad_torchtune.data import collate

    recipe = _recipe(tune.base_config(assets, tmp_path / "out", max_steps=1, export_hf=False))
    packed = collate([{"tokens": torch.arange(6), "labels": torch.arange(6),
                       "input_pos": torch.tensor([0, 1, 2, 0, 1, 0]),
                       "seq_lens": torch.tensor([3, 2, 1])}])
    prepared = recipe._prepare(packed)
    assert prepared.mask is not None and not prepared.mask[0, 3, 2] and prepared.mask[0, 4, 3]
    assert prepared.input_pos.tolist() == [[0, 1, 2, 0, 1, 0]]
    blocks = collate([{"tokens": torch.arange(6), "labels": torch.arange(6),
                       "document_ids": torch.tensor([0, 0, 0, 1, 1, 1])}])
    assert recipe._prepare(blocks).mask is None  # document_mask: false


def test_nan_stops_before_the_update_and_the_checkpoint_survives(assets, tmp_path):
    import tad_distill

    out = tmp_path / "nan"
    cfg = tune.base_config(assets, out, max_steps=10, save_every_n_steps=2, export_hf=False)
    recipe = _recipe({**cfg, "max_steps": 10})
    recipe._total_steps = 4  # stop after 4 steps without changing the schedule
    recipe.train()
    saved = {k: v.clone() for k, v in recipe._student.state_dict().items()}

    resumed = _recipe({**cfg, "resume_from_checkpoint": True})
    assert resumed.global_step == 4
    poisoned = "layers.1.mlp.w1.weight"
    with torch.no_grad():
        dict(resumed._student.named_parameters())[poisoned][0, 0] = float("nan")
    with pytest.raises(tad_distill.NonFiniteError, match="step 5: loss nan"):
        resumed.train()
    after = resumed._student.state_dict()
    for name, value in saved.items():  # no optimizer step happened
        if name != poisoned:
            assert torch.equal(after[name], value), name
    assert (out / "checkpoints" / "latest").read_text() == "step_000004"
    again = _recipe({**cfg, "resume_from_checkpoint": True})
    for name, value in again._student.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_exported_student_loads_back_with_identical_logits(assets, tmp_path):
    from torchtune import training
    from torchtune.config._utils import _get_component_from_path

    from tad_torchtune.models import forward_hidden, project_logits

    out = tmp_path / "export"
    recipe = _recipe(tune.base_config(assets, out, max_steps=3))
    recipe.train()
    student_dir = out / "student"
    checkpointer = training.FullModelHFCheckpointer(
        checkpoint_dir=str(student_dir), checkpoint_files=["model.safetensors"],
        model_type="LLAMA3", output_dir=str(tmp_path / "unused"),
    )
    config = json.loads((student_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["intermediate_size"] == 48
    kwargs = {k: v for k, v in tune.TEACHER.items() if k != "_component_"}
    loaded = _get_component_from_path(tune.TEACHER["_component_"])(
        **{**kwargs, "num_layers": 2, "intermediate_dim": 48})
    loaded.load_state_dict(checkpointer.load_checkpoint()[training.MODEL_KEY])
    tokens = torch.randint(0, tune.VOCAB, (2, 17))
    with torch.no_grad():
        expected = project_logits(recipe._student, forward_hidden(recipe._student, tokens)[0])
        got = loaded(tokens)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kd,cache_mib", [("TADLoss", 128), ("TADLoss", 0), ("ReverseKLLoss", 128)])
def test_fused_path_matches_unfused(assets, tmp_path, baseline, kd, cache_mib):
    """fused: true computes CE and the divergence from hidden states and output weights (TAD
    with its teacher projections kept between its passes, and recomputed)."""
    kd_loss = {"_component_": f"tad_torchtune.losses.{kd}"}
    if kd == "TADLoss":
        kd_loss.update(k=5, beta=2.0)
        reference = tune.train_losses(baseline)
    else:
        reference = tune.train_losses(_run(assets, tmp_path, "unfused", kd_loss=kd_loss, max_steps=4))
    out = _run(assets, tmp_path, "fused", fused=True, kd_loss=kd_loss, fused_teacher_cache_mib=cache_mib,
               max_steps=10 if kd == "TADLoss" else 4)
    _assert_same_losses(tune.train_losses(out), reference, rtol=1e-5)


def test_bf16_run_tracks_fp32(assets, tmp_path, baseline):
    """bf16 parameters and activations, float32 loss accumulation: close to the fp32 trace."""
    out = _run(assets, tmp_path, "bf16", dtype="bf16", max_steps=3)
    _assert_same_losses(tune.train_losses(out), tune.train_losses(baseline), rtol=3e-2,
                        steps=[1, 2, 3])
    import safetensors.torch

    weights = safetensors.torch.load_file(str(out / "student" / "model.safetensors"))
    assert all(w.dtype == torch.bfloat16 for w in weights.values())


# ------------------------------------------------------------------ errors a user can cause
# They end as ONE line on stderr, naming the dotted key or the file, the value and what is
# accepted, and exit 2; no traceback unless TAD_TORCHTUNE_TRACEBACK=1. Each way such an error
# reaches the user runs once through `tune run` (a config value, a damaged file, the traceback
# asked for); every other message is checked in this process through the recipe's own entry
# point (`tune.user_error`: the same parse and report, without a new process).


def _config(assets, tmp_path, **overrides) -> str:
    cfg = tune.base_config(assets, tmp_path / "out", **overrides)
    return str(tune.write_config(cfg, tmp_path / "c.yaml"))


def _distill(assets, tmp_path, *overrides, cfg_overrides=None, env=None):
    launch = [tune.tune_bin(), "run", "tad_distill", "--config",
              _config(assets, tmp_path, **(cfg_overrides or {})), *overrides]
    return subprocess.run(launch, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_a_config_error_through_tune_run_is_one_line_before_anything_loads(assets, tmp_path):
    ckpt = {**tune.base_config(assets, tmp_path)["teacher_checkpointer"],
            "checkpoint_dir": str(tmp_path / "does_not_exist")}
    proc = _distill(assets, tmp_path, "dtype=fp16", cfg_overrides={"teacher_checkpointer": ckpt})
    assert tune.one_error_line(proc) == ("tad_distill: error: dtype: must be one of ('bf16', "
                                         "'fp32'), got 'fp16'")
    assert not (tmp_path / "out").exists()  # nothing was built or written


CASES = [
    (["batch_size=0"], "batch_size: must be an integer >= 1, got 0"),
    (["kd_loss.k=0"], "kd_loss.k: must be an integer >= 1 (and < vocabulary size), got 0"),
    (["kd_loss.k=300"], "kd_loss.k: must be < the vocabulary size 256, got 300"),
    (["kd_loss.kk=3"], "kd_loss.kk: not an argument of tad_torchtune.losses.TADLoss; accepted: k, "
                        "beta, abar_scope, temperature, ignore_index"),
    (["kd_loss.abar_scope=sentence"],
     "kd_loss.abar_scope: must be one of ('row', 'document'), got 'sentence'"),
    (["dtype=fp16"], "dtype: must be one of ('bf16', 'fp32'), got 'fp16'"),
    (["fsdp_cpu_offload=true"], "fsdp_cpu_offload: true offloads a GPU's shards to the host; with "
                                "device='cpu' set it to false"),
    (["profiler.enabled=true", "profiler.active_steps=0"],
     "profiler.active_steps: must be an integer >= 1 or null, got 0"),
    (["kd_loss._component_=torch.nn.MSELoss"],
     "kd_loss._component_: 'torch.nn.MSELoss' is not a divergence; accepted: "
     "tad_torchtune.losses.DRKLLoss, tad_torchtune.losses.ForwardKLLoss, "
     "tad_torchtune.losses.ReverseKLLoss, tad_torchtune.losses.TADLoss, or another subclass of "
     "tad_torchtune.losses.Divergence"),
]


@pytest.mark.parametrize("overrides,message", CASES, ids=[c[1].split(":")[0] for c in CASES])
def test_config_errors_are_one_line(assets, tmp_path, overrides, message, monkeypatch, capsys):
    line = tune.user_error("tad_distill", ["--config", _config(assets, tmp_path), *overrides],
                           monkeypatch, capsys)
    assert line == f"tad_distill: error: {message}"
    assert not (tmp_path / "out" / "checkpoints").exists()  # nothing heavy was built


# Models that do not describe their checkpoint: each would load, some without a shape error (a
# wrong RoPE base, a model_type converting another family's weights), and train a different model
MISFITS = [
    (["teacher_checkpointer.model_type=QWEN2"],
     "teacher_checkpointer.model_type: QWEN2 converts the weights of Hugging Face model_type "
     "'qwen2', but {config} says 'llama'; accepted for it: ['LLAMA2', 'LLAMA3', 'LLAMA3_2']"),
    (["teacher_checkpointer.model_type=LLAMA32"],
     "teacher_checkpointer.model_type: 'LLAMA32' is not a checkpointer model type; accepted: "
     "['CLIP_TEXT', 'GEMMA', 'GEMMA2', 'LLAMA2', 'LLAMA3', 'LLAMA3_2', 'LLAMA3_VISION', "
     "'MISTRAL', 'PHI2', 'PHI3_MINI', 'PHI4', 'QWEN2', 'REWARD', 'T5_ENCODER']"),
    (["teacher_model.rope_base=10000"],
     "teacher_model.rope_base: torchtune.models.llama3.llama3 builds rope_base=10000, but "
     "{config} gives 500000.0: the model must be the checkpoint's"),
    (["teacher_model.norm_eps=1e-6"],
     "teacher_model.norm_eps: torchtune.models.llama3.llama3 builds norm_eps=1e-06, but "
     "{config} gives 1e-05: the model must be the checkpoint's"),
    (["teacher_model.num_kv_heads=4"],
     "teacher_model.num_kv_heads: torchtune.models.llama3.llama3 builds num_kv_heads=4, but "
     "{config} gives 2: the model must be the checkpoint's"),
    (["teacher_model._component_=torchtune.models.qwen2.qwen2"],
     "teacher_model._component_: torchtune.models.qwen2.qwen2 builds a qwen2 model (Hugging Face "
     "model_type 'qwen2'), but {config} says 'llama'"),
    (["teacher_model.scale_factor=8"],
     "teacher_model.scale_factor: not an argument of "
     "torchtune.models.llama3._component_builders.llama3; accepted: vocab_size, num_layers, "),
    (["teacher_checkpointer.checkpoint_files=model.safetensors"],
     "teacher_checkpointer.checkpoint_files: a list of file names (or torchtune's "
     "{{filename_format, max_filename}}), got the string 'model.safetensors'; write "
     "[model.safetensors]"),
    (["hidden_weight=1", "hidden_loss._component_=tad_torchtune.losses.HiddenCosineLoss",
      "student_model.embed_dim=16", "student_model.num_heads=2", "student_model.num_kv_heads=1"],
     "hidden_loss: it compares hidden states of one width, but student_model's are 16 wide and "
     "teacher_model's 32; accepted: a student of the teacher's embed_dim, or hidden_weight: 0"),
    (["hidden_weight=1", "hidden_loss._component_=tad_torchtune.losses.TADLoss"],
     "hidden_loss._component_: 'tad_torchtune.losses.TADLoss' is a divergence of logits, not a "
     "loss of hidden states; accepted: tad_torchtune.losses.HiddenCosineLoss (a divergence goes "
     "in kd_loss)"),
    (["hidden_weight=1", "hidden_loss._component_=tad_torchtune.losses.HiddenCosineLoss",
      "hidden_layers=[[1,9]]"],
     "hidden_layers: the pair [1, 9] names layer 9 of teacher_model, which has 4 layers; "
     "accepted: 0 to 4 (the input of that layer; 4: the final normed hidden state) or -1 "
     "(the same)"),
]


@pytest.mark.parametrize("overrides,message", MISFITS,
                         ids=[" ".join(o)[:40] for o, _ in MISFITS])
def test_a_model_that_is_not_its_checkpoints_is_refused_at_set_up(
        assets, tmp_path, overrides, message, monkeypatch, capsys):
    line = tune.user_error("tad_distill", ["--config", _config(assets, tmp_path), *overrides],
                           monkeypatch, capsys)
    config = str(assets["teacher"] / "config.json")
    assert line.startswith(f"tad_distill: error: {message.format(config=config)}"), line
    assert not (tmp_path / "out" / "checkpoints").exists()  # nothing heavy was built


ROWS = "tests.helpers.data_rows.rows"
# Data the models cannot take, each caught in one line: at set-up where the config says the row
# length, else at the first batch (before, a RoPE shape error, an embedding IndexError (a device
# assert on a GPU) or a dataset's traceback at the first step)
DATA_MISFITS = [
    (["dataset.max_seq_len=100"],
     "dataset.max_seq_len: rows of 100 tokens, but the models take at most 64 (their "
     "max_seq_len); accepted: at most 64"),
    ([f"dataset._component_={ROWS}", "dataset.length=80", "validation_dataset=null"],
     "tokenizer.max_seq_len: a batch has rows of 80 tokens, but the models take at most 64 "
     "(their max_seq_len); accepted: a tokenizer.max_seq_len (or the dataset's max_seq_len) of "
     "at most 64"),
    ([f"dataset._component_={ROWS}", "dataset.length=32", "dataset.top_id=300",
      "validation_dataset=null"],
     "tokenizer: the data holds token id 300, but student_model's vocabulary has 256 ids; "
     "accepted: the models' tokenizer"),
    ([f"dataset._component_={ROWS}", "dataset.length=32", "dataset.fail=true"],
     f"dataset: {ROWS} cannot make its first sample: KeyError: 'prompt'"),
    (["validation_dataset._component_=tests.helpers.data_rows.unreadable"],
     "validation_dataset: tests.helpers.data_rows.unreadable cannot be built from this config: "
     "RuntimeError: An error occurred while generating the dataset: line 1 is not JSON"),
    (["validation_dataset.validation_fraction=0.2"],
     "validation_dataset: its blocks, tokens [{v0}, {v1}) of the store {store!r}, overlap the "
     "training blocks [0, {t1}): val_kl would be measured on trained text; give dataset and "
     "validation_dataset the same source and validation_fraction, with "
     "validation_dataset.split: validation"),
    (["validation_dataset.split=train"],
     "validation_dataset: its blocks, tokens [0, 256) of the store {store!r}, overlap the "
     "training blocks [0, {t1}): val_kl would"),
]


@pytest.mark.parametrize("overrides,message", DATA_MISFITS,
                         ids=[" ".join(o)[-40:] for o, _ in DATA_MISFITS])
def test_data_the_models_cannot_take_is_one_line(assets, tmp_path, overrides, message,
                                                 monkeypatch, capsys):
    from torchtune import config

    from tad_torchtune.data import TextBlockDataset

    line = tune.user_error("tad_distill", ["--config", _config(assets, tmp_path), *overrides],
                           monkeypatch, capsys)
    cfg = tune.base_config(assets, tmp_path)
    tokenizer = config.instantiate(OmegaConf.create(cfg["tokenizer"]))
    train = TextBlockDataset(tokenizer, **{k: v for k, v in cfg["dataset"].items()
                                           if k != "_component_"})
    held = TextBlockDataset(tokenizer, **{**{k: v for k, v in cfg["dataset"].items()
                                             if k != "_component_"},
                                          "split": "validation", "validation_fraction": 0.2,
                                          "max_blocks": 8})
    expected = message.format(store=str(train.store_path), t1=train.tokens[1],
                              v0=held.tokens[0], v1=held.tokens[1])
    assert line.startswith(f"tad_distill: error: {expected}"), line


def test_a_resume_on_other_blocks_of_the_same_store_is_refused(assets, tmp_path):
    """Another block length (or validation_fraction) cuts other blocks from the same store: the
    checkpoint's data position would index other samples."""
    from tad_torchtune.errors import ConfigError

    out = tmp_path / "cut"
    cfg = tune.base_config(assets, out, max_steps=2, save_every_n_steps=2, export_hf=False)
    _recipe(cfg).train()
    moved = {**cfg, "resume_from_checkpoint": True, "max_steps": 3,
             "dataset": {**cfg["dataset"], "max_seq_len": 16}}
    with pytest.raises(ConfigError) as err:
        _recipe(moved)
    assert str(err.value).startswith(
        f"dataset: the checkpoint {str(out / 'checkpoints' / 'step_000002')!r} was trained on "
        f"{{'samples': ")
    assert "'max_seq_len': 32" in str(err.value) and "'max_seq_len': 16" in str(err.value)
    assert _recipe({**moved, "resume_on_different_data": True}).global_step == 2
    assert _recipe({**cfg, "resume_from_checkpoint": True, "max_steps": 3}).global_step == 2


def test_a_checkpoint_of_an_earlier_version_resumes_in_the_order_it_began(assets, tmp_path,
                                                                           monkeypatch):
    """A checkpoint that records no ``sample_order`` (earlier versions held ``torch.randperm``)
    resumes in that order: the resumed steps' losses are those of the run it continues, and
    another order (the computed one, recorded as this version records it) gives others. An order
    this version does not know is one line."""
    from functools import partial

    import tad_distill

    from tad_torchtune.data import ResumableBatchSampler
    from tad_torchtune.errors import ConfigError

    out = tmp_path / "old"
    cfg = tune.base_config(assets, out, max_steps=6, save_every_n_steps=3, export_hf=False,
                           validation_dataset=None)
    with monkeypatch.context() as m:  # the run as an earlier version ran it
        m.setattr(tad_distill, "ResumableBatchSampler",
                  partial(ResumableBatchSampler, order="randperm"))
        _recipe(cfg).train()
    whole = tune.train_losses(out)
    ckpt = out / "checkpoints" / "step_000003"
    meta = torch.load(ckpt / "meta.pt", weights_only=False)
    assert meta["sample_order"] == "randperm"

    def resume_as(order):
        import shutil

        shutil.rmtree(out / "checkpoints" / "step_000006", ignore_errors=True)
        (out / "checkpoints" / "latest").write_text("step_000003")
        torch.save({k: v for k, v in meta.items() if k != "sample_order"}
                   | ({} if order is None else {"sample_order": order}), ckpt / "meta.pt")
        recipe = _recipe({**cfg, "resume_from_checkpoint": True})
        assert recipe.global_step == 3
        recipe.train()
        return recipe._train_sampler.order, tune.train_losses(out)

    order, losses = resume_as(None)
    assert order == "randperm"
    _assert_same_losses(losses, whole, rtol=1e-6, steps=[4, 5, 6])
    order, losses = resume_as("feistel")
    assert order == "feistel" and all(losses[s] != whole[s] for s in (4, 5, 6)), (losses, whole)
    (out / "checkpoints" / "latest").write_text("step_000003")
    torch.save({**meta, "sample_order": "zigzag"}, ckpt / "meta.pt")
    with pytest.raises(ConfigError) as err:
        _recipe({**cfg, "resume_from_checkpoint": True})
    assert str(err.value) == (
        f"resume_from_checkpoint: {str(ckpt)!r} orders its samples by 'zigzag', which this "
        "version does not know; accepted: checkpoints ordered by one of ('feistel', "
        "'randperm') (resume with the version that wrote it)")


def test_what_an_export_says_of_its_tokenizer_is_one_line_told_once(assets, tmp_path, capsys):
    """An export that cannot make its tokenizer files prepend training's BOS (here: only a
    SentencePiece file to copy) says so in the recipe's one warning line, at its first export
    only (every checkpoint's export would repeat it of another folder); no Python warning."""
    cfg = tune.base_config(assets, tmp_path / "run", max_steps=1, validation_dataset=None)
    recipe = _recipe(cfg)
    sentencepiece_only = tmp_path / "spm"
    sentencepiece_only.mkdir()
    (sentencepiece_only / "tokenizer.model").write_bytes(b"not read")
    recipe._tokenizer_sources = [sentencepiece_only]
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recipe.export(tmp_path / "first")
        recipe.export(tmp_path / "second")
    assert not [str(w.message) for w in caught if "save_hf_checkpoint" in str(w.message)]
    bos = recipe._tokenizer.bos_id
    assert [line for line in capsys.readouterr().err.splitlines() if "warning" in line] == [
        f"tad_distill: warning: training's tokenizer put the BOS id {bos} before every document "
        f"and {str(tmp_path / 'first')!r} has no tokenizer.json in which to make "
        f"transformers.AutoTokenizer prepend it; check that the exported model's inputs begin "
        f"with it (told once)"]
    assert (tmp_path / "second" / "tokenizer.model").read_bytes() == b"not read"


def test_a_teacher_model_read_from_its_folder_trains_as_the_written_one(assets, tmp_path,
                                                                        baseline):
    """``teacher_model: {_component_: tad_torchtune.models.hf_decoder, checkpoint_dir: ...}``
    builds the teacher (and the student pruned from it) that its config.json describes: the
    baseline's losses, whose teacher node spells the builder's arguments out."""
    out = _run(assets, tmp_path, "from_folder", save_every_n_steps=2, eval_every_n_steps=5,
               teacher_model={"_component_": "tad_torchtune.models.hf_decoder",
                              "checkpoint_dir": str(assets["teacher"])})
    _assert_same_losses(tune.train_losses(out), tune.train_losses(baseline), rtol=1e-6)
    exported = json.loads((out / "student" / "config.json").read_text())
    assert exported == json.loads((baseline / "student" / "config.json").read_text())


def test_a_student_model_read_from_its_folder_starts_as_that_checkpoint(assets, tmp_path):
    """``student_model`` as ``hf_decoder`` of the teacher's own folder, loaded from it by a
    ``student_checkpointer``: the student is the teacher (as many weights, and the first step's
    divergence 0 in both TAD terms, where a student of the base config starts near 2)."""
    teacher_dir = str(assets["teacher"])
    cfg = tune.base_config(assets, tmp_path / "run", max_steps=1, log_every_n_steps=1,
                           validation_dataset=None, export_hf=False)
    cfg["student_model"] = {"_component_": "tad_torchtune.models.hf_decoder",
                            "checkpoint_dir": teacher_dir}
    cfg["student_checkpointer"] = {**cfg["teacher_checkpointer"],
                                   "output_dir": str(tmp_path / "student_checkpointer")}
    recipe = _recipe(cfg)
    assert sum(p.numel() for p in recipe._student.parameters()) == \
        sum(p.numel() for p in recipe._teacher.parameters())
    recipe.train()
    first = next(r for r in tune.read_metrics(tmp_path / "run") if "loss" in r)
    assert first["kd_loss"] == first["kd/dkl1"] == first["kd/dkl2"] == 0.0
    assert first["ce"] > 1.0  # a step that scored tokens


def test_a_student_its_teacher_s_config_json_cannot_describe_is_refused_before_training(
        assets, tmp_path):
    """Without a student_checkpointer the export starts from the teacher's config.json: a
    student of another model type (a Qwen2 builder under a Llama teacher) trained to its end and
    then failed to export; now one line at set-up."""
    from tad_torchtune.errors import ConfigError

    cfg = tune.base_config(assets, tmp_path / "run", max_steps=1)
    cfg["student_model"] = {"_component_": "torchtune.models.qwen2.qwen2", "vocab_size": 256,
                            "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "embed_dim": 32,
                            "intermediate_dim": 48, "max_seq_len": 64}
    with pytest.raises(ConfigError) as err:
        _recipe(cfg)
    assert str(err.value) == (
        "student_model: a qwen2 student (Hugging Face model_type 'qwen2') without a "
        "student_checkpointer is exported on the teacher's config.json, of model_type 'llama', "
        "which cannot describe it; accepted: a student of the teacher's model type, or a "
        "student_checkpointer with the student's own folder")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_and_truncated_checkpoint_files_are_named(assets, tmp_path, monkeypatch, capsys):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(assets["teacher"], teacher)
    weights = teacher / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size - 1000)
    ckpt = {**tune.base_config(assets, tmp_path)["teacher_checkpointer"],
            "checkpoint_dir": str(teacher)}
    line = tune.one_error_line(_distill(assets, tmp_path, cfg_overrides={"teacher_checkpointer": ckpt}))
    assert line.startswith(f"tad_distill: error: teacher_checkpointer.checkpoint_files: "
                           f"{str(weights)!r} is not a readable safetensors file: its tensors "
                           f"need {size} bytes, the file has {size - 1000}: truncated")
    weights.unlink()
    line = tune.user_error("tad_distill", ["--config", _config(
        assets, tmp_path, teacher_checkpointer=ckpt)], monkeypatch, capsys)
    assert line == (f"tad_distill: error: teacher_checkpointer.checkpoint_files: "
                    f"{str(weights)!r} does not exist")


def test_a_missing_corpus_names_the_dataset_key(assets, tmp_path, monkeypatch, capsys):
    """Named by its key, and found before any checkpoint is read (here a missing teacher
    checkpoint, which would be reported first otherwise): a dataset's error costs no model
    load."""
    missing = tmp_path / "nowhere.jsonl"
    ckpt = {**tune.base_config(assets, tmp_path)["teacher_checkpointer"],
            "checkpoint_files": ["missing.safetensors"]}
    line = tune.user_error("tad_distill", ["--config", _config(assets, tmp_path,
                                                               teacher_checkpointer=ckpt),
                                           f"validation_dataset.source={missing}"],
                           monkeypatch, capsys)
    assert line.startswith("tad_distill: error: validation_dataset.source: ")
    assert str(missing) in line


def test_the_traceback_when_asked_for(assets, tmp_path):
    proc = _distill(assets, tmp_path, "batch_size=0", env={"TAD_TORCHTUNE_TRACEBACK": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    assert "ConfigError: batch_size: must be an integer >= 1, got 0" in proc.stderr


def test_setup_reports_its_time_the_models_and_the_run_in_one_line(assets, tmp_path, capsys):
    """After set-up, rank 0 prints one line: its seconds, the teacher's and student's sizes
    (the student's trainable part: without its frozen embedding and output), the run's length
    and memory, the sizes equal to the config's models counted on the meta device."""
    import re

    from tad_torchtune.models import build_model

    out = tmp_path / "run"
    cfg = tune.base_config(assets, out, max_steps=2, export_hf=False, validation_dataset=None)
    tune.run_recipe("tad_distill", cfg)
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if "set up in" in ln]
    got = re.fullmatch(r"tad_distill: set up in [\d.]+ s on cpu: teacher (\S+), student (\S+) "
                       r"\((\S+) trainable\), float32; 2 steps of 8 sequences from step 0; "
                       r"rank 0: peak RSS [\d.]+ GiB", line)
    assert got, line

    def value(text: str) -> float:
        return float(text.rstrip("KMB")) * {"K": 1e3, "M": 1e6, "B": 1e9}.get(text[-1], 1)

    resolved = OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)
    with torch.device("meta"):
        teacher, _ = build_model(resolved["teacher_model"])
        student, _ = build_model(resolved["student_model"])
    total = sum(p.numel() for p in student.parameters())
    frozen = student.tok_embeddings.weight.numel() + student.output.weight.numel()
    for text, expected in zip(got.groups(), (sum(p.numel() for p in teacher.parameters()),
                                             total, total - frozen)):
        assert value(text) == pytest.approx(expected, rel=5e-3), (text, expected)


@pytest.mark.slow
def test_a_bad_checkpoint_stops_every_process(assets, tmp_path):
    """On two processes rank 0 alone reads the teacher's checkpoint (``parallel.on_rank0``):
    a truncated file stops both ranks at once, with the error's one line, printed by rank 0;
    rank 1, which never reads the file, raises rank 0's error (``ReportedElsewhere``, never
    printed) instead of waiting for weights rank 0 never sends (torchrun would stop it after
    rank 0's exit; a launcher without its agent might not)."""
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(assets["teacher"], teacher)
    weights = teacher / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 1000)
    cfg = tune.base_config(assets, tmp_path / "out", batch_size=4)
    cfg["teacher_checkpointer"]["checkpoint_dir"] = str(teacher)
    _two_processes_print_one_line(cfg, tmp_path, "teacher_checkpointer.checkpoint_files: "
                                  f"{str(weights)!r} is not a readable safetensors file")


def _two_processes_print_one_line(cfg: dict, tmp_path, message: str) -> None:
    """``cfg`` on two processes stops in seconds with ``message`` printed once, by rank 0, and
    no traceback of either rank's."""
    out = Path(cfg["output_dir"])
    out.mkdir(exist_ok=True)
    start = time.time()
    proc = tune.run_tune(["tad_distill", "--config", str(tune.write_config(cfg, out / "c.yaml"))],
                         cwd=tmp_path, nproc=2, check=False, timeout=120)
    assert proc.returncode != 0 and time.time() - start < 100
    assert proc.stderr.count("tad_distill: error: ") == proc.stderr.count(
        f"tad_distill: error: {message}") == 1, proc.stderr[-3000:]
    assert "[rank1]" not in proc.stderr and "[rank0]" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_an_error_of_rank_0_alone_is_one_line(assets, tmp_path):
    """Rank 0 alone prepares the output folder; a file in the way of the student's export
    stops it there, at set-up (not after training), with one line naming output_dir. Rank 1,
    waiting for rank 0's checkpoint in ``on_rank0``, learns that rank 0 has gone
    (``ReportedElsewhere``) or is stopped by torchrun: either way it adds no line and no
    traceback."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "student").write_text("in the way")
    _two_processes_print_one_line(
        tune.base_config(assets, out, batch_size=4), tmp_path,
        f"output_dir: {str(out / 'student')!r} is a file; it must be the student's export "
        "folder or not exist")


def _padded_teacher(assets, folder: Path, extra: int, boosted: dict[int, float]) -> Path:
    """A copy of the assets' teacher with ``extra`` output rows past its vocabulary (a padded
    table, as Phi-3's 32064 rows beside Llama-2's 32000), some ``boosted`` to hold mass."""
    from safetensors.torch import load_file, save_file

    folder.mkdir()
    weights = load_file(assets["teacher"] / "model.safetensors")
    g = torch.Generator().manual_seed(3)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in weights:
            rows = torch.randn(extra, weights[key].shape[1], generator=g) * 0.05
            weights[key] = torch.cat([weights[key], rows])
    for row, scale in boosted.items():
        weights["lm_head.weight"][row] = weights["lm_head.weight"][row % 7] * scale
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    hf = json.loads((assets["teacher"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**hf, "vocab_size": hf["vocab_size"] + extra}))
    return folder


def test_merged_teacher_ids_train_the_same_fused_and_unfused(assets, tmp_path, capsys,
                                                             monkeypatch):
    """``teacher_id_merges`` in ``tad_distill``: a padded teacher's merged ids reach the
    fused and the unfused head alike (the same first step), and change the divergence against
    the cut alone; a cache made with them records them, and a run reading it with other merges
    says so in one line."""
    from tests.helpers.tune import TEACHER, VOCAB

    padded = _padded_teacher(assets, tmp_path / "padded", 8, {VOCAB + 1: 8.0, VOCAB + 5: 8.0})
    merges = {VOCAB + 1: 3, VOCAB + 5: 3}

    def first_step(name, **overrides):
        cfg = tune.base_config(assets, tmp_path / name, max_steps=1, validation_dataset=None,
                               export_hf=False, vocab_alignment="truncate_teacher",
                               **overrides)
        cfg["teacher_model"] = {**TEACHER, "vocab_size": VOCAB + 8}
        cfg["teacher_checkpointer"]["checkpoint_dir"] = str(padded)
        cfg["student_model"] = {**TEACHER, "num_layers": 1}  # the student's VOCAB ids
        recipe = _recipe(cfg)
        recipe.train()
        return next(r for r in tune.read_metrics(tmp_path / name) if "loss" in r)

    unfused = first_step("unfused", teacher_id_merges=merges)
    fused = first_step("fused", teacher_id_merges=merges, fused=True)
    cut = first_step("cut")
    for key in ("loss", "kd_loss", "kd/dkl1", "kd/dkl2", "ce"):
        assert fused[key] == pytest.approx(unfused[key], rel=1e-5), key
    assert abs(unfused["kd_loss"] - cut["kd_loss"]) > 0.01 * cut["kd_loss"]

    from tad_torchtune.teacher_cache import TeacherCache

    cfg = tune.base_config(assets, tmp_path / "cache_run", max_steps=1, validation_dataset=None,
                           vocab_alignment="truncate_teacher", teacher_id_merges=merges,
                           teacher_cache_dir=str(tmp_path / "cache"), cache_mode="top_m")
    cfg["teacher_model"] = {**TEACHER, "vocab_size": VOCAB + 8}
    cfg["teacher_checkpointer"]["checkpoint_dir"] = str(padded)
    cfg["student_model"] = {**TEACHER, "num_layers": 1}
    cfg["dataset"]["max_blocks"] = 8
    path = tune.write_config(cfg, tmp_path / "cache.yaml")
    tune.run_in_process("tad_cache", ["--config", str(path)], monkeypatch)
    assert TeacherCache(tmp_path / "cache").teacher_id_merges == merges
    capsys.readouterr()
    cfg.pop("teacher_id_merges")
    _recipe(cfg)
    assert [line for line in capsys.readouterr().err.splitlines() if "teacher_id_merges" in line] \
        == [f"tad_distill: warning: teacher_id_merges: None, the teacher cache's {merges!r}: "
            f"training reads the cache's teacher as it was made, validation's live teacher "
            f"merges as this config says"]

    # a mistake in the merges is one line naming the key, before any weight is read
    import tad_distill

    def read(*args, **kwargs):
        raise AssertionError("a checkpoint was read before the config was checked")

    monkeypatch.setattr(tad_distill, "checkpoint_state", read)
    for merges, message in (({"eos": 3}, "teacher_id_merges: 'eos' is not a teacher id"),
                            ({VOCAB + 1: VOCAB}, f"teacher_id_merges.{VOCAB + 1}: {VOCAB}; "
                                                 f"accepted: a student id from 0 to {VOCAB - 1}")):
        with pytest.raises(ValueError) as err:
            _recipe({**cfg, "teacher_id_merges": merges})
        assert str(err.value).startswith(message)


def test_a_resume_with_other_merges_says_the_loss_changes(assets, tmp_path, capsys):
    """``teacher_id_merges`` are this run's on a resume: a change is one line (from a teacher
    cache, only validation's teacher changes: said so); the same merges written otherwise
    (string keys, another order) say nothing; a checkpoint of an earlier version (no merges
    recorded) says nothing."""
    from tad_distill import changed_settings
    from tests.helpers.tune import TEACHER, VOCAB

    padded = _padded_teacher(assets, tmp_path / "padded", 8, {VOCAB + 1: 8.0})
    cfg = tune.base_config(assets, tmp_path / "run", max_steps=2, save_every_n_steps=2,
                           validation_dataset=None, export_hf=False,
                           vocab_alignment="truncate_teacher",
                           teacher_id_merges={VOCAB + 1: 3, VOCAB + 2: 3})
    cfg["teacher_model"] = {**TEACHER, "vocab_size": VOCAB + 8}
    cfg["teacher_checkpointer"]["checkpoint_dir"] = str(padded)
    cfg["student_model"] = {**TEACHER, "num_layers": 1}
    _recipe(cfg).train()

    def told(**overrides):
        capsys.readouterr()
        _recipe({**cfg, "resume_from_checkpoint": True, "max_steps": 3, **overrides})
        return [line for line in capsys.readouterr().err.splitlines()
                if "teacher_id_merges" in line]

    assert told() == []
    assert told(teacher_id_merges={str(VOCAB + 2): 3, str(VOCAB + 1): 3}) == []
    assert told(teacher_id_merges=None) == [
        f"tad_distill: warning: teacher_id_merges: None differs from the checkpoint's run "
        f"{{{VOCAB + 1}: 3, {VOCAB + 2}: 3}}: the teacher's distribution over the student's "
        f"ids, so the loss, changes at step 3"]

    then = {"total_steps": 4, "teacher_id_merges": None}
    now = {"total_steps": 4, "teacher_id_merges": {32000: 2}, "from_cache": True}
    assert changed_settings(then, now, 2) == [
        "teacher_id_merges: {32000: 2} differs from the checkpoint's run None: validation's "
        "teacher (val_kl) changes; training reads the teacher cache as it was made"]
    assert changed_settings({"total_steps": 4}, now, 2) == []  # an earlier version's
    assert changed_settings(then, {**now, "total_steps": 2}, 2) == [  # nothing trains
        "max_steps, epochs: this run ends at step 2, at or before the checkpoint's step 2: "
        "nothing trains, and the checkpoint's student is exported"]


def test_a_teacher_tokenizer_of_other_ids_is_refused_before_any_weight_is_read(
        assets, tmp_path, monkeypatch, capsys):
    """``teacher_tokenizer`` mapping shared ids to other tokens: one line naming the key,
    before the teacher's checkpoint is read (it was read first, and the line had no key); the
    same tokenizer says nothing."""
    import tad_distill

    tok = assets["tokenizer"]
    swapped = json.loads((tok / "tokenizer.json").read_text())
    vocab = swapped["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[40:42]  # printable: decoded apart
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tmp_path / "swapped.json").write_text(json.dumps(swapped))
    cfg = tune.base_config(assets, tmp_path / "run", max_steps=1, validation_dataset=None,
                           export_hf=False)
    same = dict(cfg["tokenizer"])
    capsys.readouterr()
    _recipe({**cfg, "teacher_tokenizer": same})
    assert "teacher_tokenizer" not in capsys.readouterr().err

    def read(*args, **kwargs):
        raise AssertionError("a checkpoint was read before the tokenizers were checked")

    monkeypatch.setattr(tad_distill, "checkpoint_state", read)
    with pytest.raises(ValueError) as err:
        _recipe({**cfg, "output_dir": str(tmp_path / "other"),
                 "teacher_tokenizer": {**same, "tokenizer_json_path": str(tmp_path / "swapped.json")}})
    assert str(err.value).startswith(
        "teacher_tokenizer: teacher tokenizer (HuggingFaceBaseTokenizer) and student tokenizer "
        "(HuggingFaceBaseTokenizer) disagree on 2 of the "), str(err.value)


def test_merges_with_a_soft_capping_teacher_are_refused_before_any_weight_is_read(
        assets, tmp_path, monkeypatch):
    """Gemma2's logit soft-cap, read from its config.json on a meta build: one line, before the
    checkpoint is read."""
    import tad_distill
    import transformers

    from tests.helpers.teachers import VOCAB as V, hf_config, teacher_node

    folder = tmp_path / "gemma2"
    hf = {**hf_config("gemma2"), "vocab_size": V + 8}
    hf.pop("model_type")
    transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**hf)).save_pretrained(folder)
    cfg = tune.base_config(assets, tmp_path / "run", max_steps=1, validation_dataset=None,
                           export_hf=False, vocab_alignment="truncate_teacher",
                           teacher_id_merges={V + 1: 3})
    cfg["teacher_model"] = {"_component_": "tad_torchtune.models.hf_decoder",
                            "checkpoint_dir": str(folder)}
    cfg["teacher_checkpointer"].update(checkpoint_dir=str(folder), model_type="GEMMA2")
    cfg["student_model"] = dict(teacher_node("gemma2"), num_layers=1)

    def read(*args, **kwargs):
        raise AssertionError("a checkpoint was read before the merges were checked")

    monkeypatch.setattr(tad_distill, "checkpoint_state", read)
    with pytest.raises(ValueError) as err:
        _recipe(cfg)
    assert str(err.value).startswith(f"teacher_id_merges: {{{V + 1}: 3}} with a teacher that "
                                     f"soft-caps its logits ("), str(err.value)
