"""``tune run tad_cache`` and ``tad_distill`` from a teacher cache, on tiny local models."""

import filecmp
import json
import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import tune

V = tune.VOCAB
#: the first 202 training blocks of 32 tokens, not all 1658: in shards of 4, an odd number of
#: shards (51) and a short last one (2 blocks), as the whole split has; 25 optimizer steps of 8
SMALL = {"dataset.max_blocks": 202}


def _config(assets, output_dir, **overrides) -> dict:
    """The recipe tests' config on ``SMALL``'s blocks, for every run of this module (a cache
    and the runs that read it must see the same blocks)."""
    return tune.base_config(assets, output_dir, **{**SMALL, **overrides})


@pytest.fixture(scope="module")
def online(assets, tmp_path_factory):
    """The reference: 6 steps with the live teacher."""
    out = tmp_path_factory.mktemp("online") / "out"
    tune.run_recipe("tad_distill", _config(assets, out, max_steps=6, eval_every_n_steps=3,
                                           export_hf=False))
    return out


def _cache(assets, tmp_path, name, nproc=1, **overrides) -> Path:
    """A teacher cache of the tiny config: in this process (``tune.run_recipe``), or through
    ``tune run`` on ``nproc`` processes."""
    cache = tmp_path / name
    cfg = _config(assets, tmp_path / "unused", teacher_cache_dir=str(cache), **overrides)
    if nproc == 1:
        tune.run_recipe("tad_cache", cfg)
    else:
        tune.run_tune(["tad_cache", "--config", str(tune.write_config(cfg, tmp_path / f"{name}.yaml"))],
                      cwd=tmp_path, nproc=nproc)
    return cache


def _same_shards(a: Path, b: Path) -> None:
    names = sorted(p.name for p in (a / "train").glob("shard_*"))
    assert names and names == sorted(p.name for p in (b / "train").glob("shard_*"))
    for name in names:
        files = sorted(p.name for p in (a / "train" / name).glob("*.npy"))
        assert len(files) >= 4 and files == sorted(p.name for p in (b / "train" / name).glob("*.npy"))
        for f in files:
            assert filecmp.cmp(a / "train" / name / f, b / "train" / name / f, shallow=False), \
                (name, f)


#: the two cache kinds at tiny sizes: the bucket cache, and top-8 ids plus 5 draws
MODES = {"top_m": {"cache_mode": "top_m", "cache_top_m": 8}, "sampled": {"cache_mode": "sampled", "cache_top_m": 8,
                                                  "cache_samples": 5, "cache_seed": 3}}


@pytest.fixture(scope="module", params=["top_m", "sampled"])
def exact_cache(assets, tmp_path_factory, request):
    """A cache holding all but one id per position in float32: the bucket (the rest the draws
    come from) is one id, so the cached losses are the online ones."""
    tmp = tmp_path_factory.mktemp("exact")
    cache = _cache(assets, tmp, "cache", cache_top_m=V - 1, cache_logp_dtype="float32",
                      cache_shard_blocks=16, cache_mode=request.param, cache_samples=1)
    return cache


def _run(assets, tmp_path, name, nproc=1, **overrides):
    """A 6-step run: in this process, or through ``tune run`` on ``nproc`` processes."""
    out = tmp_path / name
    out.mkdir(parents=True, exist_ok=True)
    cfg = _config(assets, out, max_steps=6, eval_every_n_steps=3, export_hf=False, **overrides)
    if nproc == 1:
        tune.run_recipe("tad_distill", cfg)
    else:
        tune.run_tune(["tad_distill", "--config", str(tune.write_config(cfg, out / "c.yaml"))],
                      cwd=tmp_path, nproc=nproc)
    return out


@pytest.fixture(scope="module")
def from_cache(assets, exact_cache, tmp_path_factory):
    """The run from ``exact_cache`` on one process, unfused, batch 8: what the online run is
    compared with, and the runs with accumulation or two processes."""
    return _run(assets, tmp_path_factory.mktemp("from_cache"), "one",
                teacher_cache_dir=str(exact_cache))


def _same(a: dict, b: dict, rtol: float):
    assert sorted(a) == sorted(b) and a
    for step in a:
        assert math.isclose(a[step], b[step], rel_tol=rtol), (step, a[step], b[step])


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True])
def test_training_from_an_exact_cache_gives_the_online_losses(assets, online, exact_cache,
                                                              from_cache, tmp_path, fused):
    out = from_cache if not fused else _run(assets, tmp_path, "cached", fused=True,
                                            teacher_cache_dir=str(exact_cache))
    _same(tune.train_losses(out), tune.train_losses(online), rtol=1e-5)
    # validation ran with the live teacher: the exact held-out KL, as online
    val = {r["step"]: r["val_kl"] for r in tune.read_metrics(out) if "val_kl" in r}
    ref = {r["step"]: r["val_kl"] for r in tune.read_metrics(online) if "val_kl" in r}
    _same(val, ref, rtol=1e-5)
    manifest = json.loads((exact_cache / "manifest.json").read_text())
    assert manifest["top_m"] == V - 1 and manifest["splits"]["train"]["max_seq_len"] == 32


@pytest.mark.slow
def test_a_document_masked_cache_gives_the_online_document_masked_losses(assets, tmp_path):
    """document_mask: tad_cache runs the teacher within documents, as tad_distill does live, so
    training from an exact cache gives the online losses; a run whose document_mask differs
    from the cache's is refused. 64-token blocks: one in nine holds a document boundary."""
    masked = {"document_mask": True, "dataset.max_seq_len": 64,
              "validation_dataset.max_seq_len": 64}
    online = _run(assets, tmp_path, "online", **masked)
    cache = _cache(assets, tmp_path, "cache", cache_top_m=V - 1, cache_logp_dtype="float32",
                   cache_shard_blocks=16, cache_mode="top_m", **masked)
    assert json.loads((cache / "manifest.json").read_text())["document_mask"] is True
    cached = _run(assets, tmp_path, "cached", teacher_cache_dir=str(cache), **masked)
    _same(tune.train_losses(cached), tune.train_losses(online), rtol=1e-5)
    unmasked = _run(assets, tmp_path, "unmasked", **{**masked, "document_mask": False})
    diff = max(abs(a - b) / b for a, b in zip(tune.train_losses(unmasked).values(),
                                              tune.train_losses(online).values()))
    assert diff > 1e-4  # the masks change these losses: the comparison above can see them
    from tad_torchtune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^document_mask: false here, but the teacher cache "):
        _run(assets, tmp_path, "refused", teacher_cache_dir=str(cache),
             **{**masked, "document_mask": False})


@pytest.mark.slow
def test_accumulation_and_two_processes_from_the_cache(assets, exact_cache, from_cache, tmp_path):
    one = from_cache
    accum = _run(assets, tmp_path, "accum", teacher_cache_dir=str(exact_cache), batch_size=2,
                 gradient_accumulation_steps=4)
    two = _run(assets, tmp_path, "two", nproc=2, teacher_cache_dir=str(exact_cache), batch_size=4)
    _same(tune.train_losses(accum), tune.train_losses(one), rtol=1e-5)
    _same(tune.train_losses(two), tune.train_losses(one), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_killed_tad_cache_resumes_to_the_same_bytes(assets, tmp_path, mode):
    whole = _cache(assets, tmp_path, "whole", cache_shard_blocks=4, batch_size=2,
                      **MODES[mode])
    cache = tmp_path / "killed"
    cfg = _config(assets, tmp_path / "unused", teacher_cache_dir=str(cache),
                           cache_shard_blocks=4, batch_size=2, **MODES[mode])
    path = tune.write_config(cfg, tmp_path / "killed.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([tune.tune_bin(), "run", "tad_cache", "--config", str(path)],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((cache / "train").glob("shard_*")):
        assert proc.poll() is None, "tad_cache ended before it could be killed"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (cache / "train").glob("shard_*"))
    total = sorted(p.name for p in (whole / "train").glob("shard_*"))
    assert 0 < len(done) < len(total), (done, total)
    tune.run_recipe("tad_cache", cfg)  # the rest, in this process
    _same_shards(whole, cache)
    assert not list((cache / "train").glob(".*"))  # no temporary folder left


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(MODES))
def test_tad_cache_on_two_processes_writes_the_same_bytes(assets, tmp_path, mode):
    """Each process takes its share of the shards (the teacher sharded with FSDP2): the cache
    is byte for byte the one a single process writes. The split has an odd number of shards
    (202 blocks / 4) and a short last one (2 blocks, 1 batch where the others have 2), so the
    ranks run different shard and batch counts: each must still run as many teacher forwards
    as the other, or FSDP's all-gathers wait forever (the first version hung here)."""
    import re

    one = _cache(assets, tmp_path, "one", cache_shard_blocks=4, batch_size=2, **MODES[mode])
    two = tmp_path / "two"
    cfg = _config(assets, tmp_path / "unused", teacher_cache_dir=str(two), cache_shard_blocks=4,
                  batch_size=2, **MODES[mode])
    proc = tune.run_tune(["tad_cache", "--config", str(tune.write_config(cfg, tmp_path / "two.yaml"))],
                         cwd=tmp_path, nproc=2)
    _same_shards(one, two)
    # the summary counts every process's tokens, rank 0's share beside them: 26 of the 51
    # shards, the last of 2 blocks
    (line,) = [x for x in proc.stderr.splitlines() if "shards written" in x]
    length = cfg["dataset"]["max_seq_len"]
    assert re.fullmatch(rf"tad_cache: train: 51 of 51 shards written \({202 * length} tokens, "
                        rf"\d+ tokens/s; {102 * length} of them on this process\)", line), line
    assert json.loads((one / "manifest.json").read_text()) == json.loads(
        (two / "manifest.json").read_text())


def test_the_profiler_key_profiles_the_teacher_s_batches(assets, tmp_path, capsys):
    """``tad_cache`` reads ``tad_distill``'s ``profiler`` block, a step being one batch's
    teacher forward and statistics: torchtune's trace where it writes them, one line of the
    cycle's reading on the batch that ends it, and the same cache as without the profiler."""
    plain = _cache(assets, tmp_path, "plain")
    profiled = _cache(assets, tmp_path, "profiled",
                      profiler={"enabled": True, "wait_steps": 1, "warmup_steps": 1,
                                "active_steps": 2, "num_cycles": 1})
    _same_shards(plain, profiled)
    cycle = tmp_path / "unused" / "profiling_outputs" / "iteration_4"
    assert (cycle / "rank0_key_averages.txt").is_file()
    assert len(list(cycle.glob("*.pt.trace.json.gz"))) == 1
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "profiled:" in x]
    assert line.startswith("tad_cache: batch 4 profiled: "), line
    # the teacher's batch is its projections and attention: both took time
    assert re.search(r"ms by kind: .*matmul [0-9.]+", line) and "attention" in line, line


def test_a_run_shorter_than_the_split_is_noted(assets, tmp_path, capsys):
    """The whole training split is cached whatever ``max_steps`` reads of it: one line says how
    many blocks the run reads and how to cache only those; none when the run reads them all."""
    _cache(assets, tmp_path, "short", max_steps=1, gradient_accumulation_steps=2,
           **{"dataset.max_blocks": 24})
    notes = [x for x in capsys.readouterr().err.splitlines() if "note:" in x]
    assert notes == [
        "tad_cache: note: max_steps=1 trains on 16 of the 24 training blocks cached here "
        "(max_steps x batch_size x gradient_accumulation_steps); dataset.max_blocks=16 caches, "
        "and trains on, the first 16 only"]
    _cache(assets, tmp_path, "whole", max_steps=3, **{"dataset.max_blocks": 24})
    err = capsys.readouterr().err
    assert "note:" not in err
    # the size line: what the files hold (24 blocks of 32 tokens), all of it left to write
    (size,) = [x for x in err.splitlines() if "bytes each" in x]
    from tad_torchtune.teacher_cache import TeacherCache

    cache = TeacherCache(tmp_path / "whole")
    on_disk = sum(f.stat().st_size for f in (tmp_path / "whole").rglob("*.npy"))
    per_token = cache.bytes_per_token()
    assert on_disk == pytest.approx(24 * 32 * per_token, rel=0.05)  # beside the .npy headers
    assert size == (f"tad_cache: 768 tokens at {per_token:.0f} bytes each: "
                    f"{768 * per_token / 1e6:.1f} MB in {str(tmp_path / 'whole')!r}, "
                    f"{768 * per_token / 1e6:.1f} MB of it left to write")


def test_cache_errors_name_the_keys(assets, tmp_path, monkeypatch, capsys):
    """What tad_distill refuses of a cache, one line each (in this process, through the
    recipe's entry point: ``tune.user_error``; the `tune run` path of such lines:
    ``tests/recipes/test_tad_distill.py``)."""
    from tad_torchtune.teacher_cache import TeacherCache

    cache = tmp_path / "small"
    # tad_cache refuses first a cache its config's loss could not read (TAD's k=5 > 4), before
    # the teacher's pass over the corpus
    cfg = _config(assets, tmp_path / "unused", teacher_cache_dir=str(cache), cache_top_m=4)
    line = tune.user_error("tad_cache", ["--config", str(tune.write_config(
        cfg, tmp_path / "small.yaml"))], monkeypatch, capsys)
    assert line == ("tad_cache: error: kd_loss.k: k=5 exceeds the teacher cache's top_m=4 (the "
                    "cache this makes: cache_mode=sampled, cache_top_m=4): TAD from a cache "
                    "needs its top-K among the cached ids (k <= top_m); make the cache with "
                    "cache_top_m >= 5")
    assert not cache.exists()
    cfg = _config(assets, tmp_path / "unused", teacher_cache_dir=str(cache), cache_top_m=4,
                  **{"kd_loss.k": 4})
    capsys.readouterr()
    tune.run_in_process("tad_cache", ["--config", str(tune.write_config(cfg, tmp_path / "small.yaml"))],
                        monkeypatch)
    assert "bytes per token" in capsys.readouterr().out

    def fails(**overrides):
        cfg = _config(assets, tmp_path / "o", **{"teacher_cache_dir": str(cache),
                                                          **overrides})
        return tune.user_error("tad_distill", ["--config", str(tune.write_config(
            cfg, tmp_path / "bad.yaml"))], monkeypatch, capsys)

    line = fails()  # the tiny config's TAD has k=5 > 4
    assert line == (f"tad_distill: error: kd_loss.k: k=5 exceeds the teacher cache's top_m=4 "
                    f"(teacher_cache_dir={str(cache)!r}): TAD from a cache needs its top-K among "
                    f"the cached ids (k <= top_m); make the cache with cache_top_m >= 5")
    # tad_cache's keys set otherwise than the cache was made: read as it is, and said
    assert TeacherCache(cache).differences({"cache_mode": "sampled", "cache_top_m": 8,
                                             "cache_samples": None, "cache_seed": 3}) == [
        "cache_top_m=8 (the cache's: 4)", "cache_seed=3 (the cache's: 0)"]
    capsys.readouterr()
    cfg = _config(assets, tmp_path / "read", teacher_cache_dir=str(cache), cache_top_m=8,
                  max_steps=1, export_hf=False, **{"kd_loss.k": 4})
    tune.run_in_process("tad_distill", ["--config", str(tune.write_config(
        cfg, tmp_path / "read.yaml"))], monkeypatch)
    assert (f"tad_distill: warning: cache_top_m=8 (the cache's: 4): tad_cache's keys shape a "
            f"cache as it is made; this run reads the one in {str(cache)!r} as it is"
            ) in capsys.readouterr().err.splitlines()
    line = fails(**{"kd_loss.k": 2, "kd_loss.temperature": 2.0})
    assert line.startswith("tad_distill: error: kd_loss.temperature: 2.0 differs from the "
                           "teacher cache's 1.0")
    line = fails(**{"dataset.max_seq_len": 16, "kd_loss.k": 2})
    assert "teacher_cache_dir: " in line and "was made for other train blocks" in line
    line = fails(**{"dataset.max_blocks": 100, "kd_loss.k": 2})  # the cache has 202
    assert line.endswith("was made for other train blocks: num_blocks 202 there, 100 here "
                         "(another dataset.max_blocks, validation_fraction or split); run "
                         "tad_cache again with this config"), line
    line = fails(hidden_weight=1.0, hidden_loss={
        "_component_": "tad_torchtune.losses.HiddenCosineLoss"})
    assert line.startswith("tad_distill: error: hidden_weight: the hidden-state loss needs the "
                           "live teacher's hidden states")
    # another teacher of the same shapes and file size (the lowest mantissa bit of every float32
    # weight flipped, as a fine-tune saved in place would differ): the cache is not its
    import shutil
    import struct

    other = tmp_path / "other_teacher"
    shutil.copytree(assets["teacher"], other)
    data = bytearray((other / "model.safetensors").read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]  # past the header: the weights, float32
    data[start::4] = bytes(b ^ 1 for b in data[start::4])
    (other / "model.safetensors").write_bytes(bytes(data))
    line = fails(**{"kd_loss.k": 2, "teacher_checkpointer.checkpoint_dir": str(other)})
    size = (other / "model.safetensors").stat().st_size
    assert line == (
        f"tad_distill: error: teacher_checkpointer.checkpoint_files: 'model.safetensors' holds "
        f"other weights than the cache's teacher's (size {size}, the cache's {size}; another "
        f"content digest): the teacher cache {str(cache)!r} was made by another teacher (from "
        f"{str(Path(assets['teacher']).resolve())!r}); accepted: the cache's teacher, or a "
        f"cache of this one (tune run tad_cache into another teacher_cache_dir)")
    # the teacher's checkpoint files are checked before the cache's teacher is compared
    line = fails(**{"kd_loss.k": 2, "teacher_checkpointer.checkpoint_files": "model.safetensors"})
    assert line.startswith("tad_distill: error: teacher_checkpointer.checkpoint_files: "), line
    assert "model.safetensors" in line and "another teacher" not in line, line
    empty = tmp_path / "empty"
    empty.mkdir()
    line = fails(teacher_cache_dir=str(empty))
    assert f"teacher_cache_dir: {str(empty)!r} holds no teacher cache (no manifest.json)" in line
    # tad_cache's own: blocks longer than the teacher takes, before the checkpoint is read
    cfg = _config(assets, tmp_path / "long", teacher_cache_dir=str(tmp_path / "long_cache"))
    cfg["dataset"]["max_seq_len"] = 100
    line = tune.user_error("tad_cache", ["--config", str(tune.write_config(
        cfg, tmp_path / "long.yaml"))], monkeypatch, capsys)
    assert line == ("tad_cache: error: dataset.max_seq_len: rows of 100 tokens, but the models "
                    "take at most 64 (their max_seq_len); accepted: at most 64")
    cfg = _config(assets, tmp_path / "wide", teacher_cache_dir=str(tmp_path / "wide_cache"),
                  cache_top_m=300)
    line = tune.user_error("tad_cache", ["--config", str(tune.write_config(
        cfg, tmp_path / "wide.yaml"))], monkeypatch, capsys)
    assert line == ("tad_cache: error: cache_top_m: 300 ids kept of a vocabulary of 256; "
                    "accepted: 1 to 255")
    assert not (tmp_path / "wide_cache").exists()  # no manifest a corrected run would refuse
    # instruct rows (prompt-masked, of any length) have no blocks to align a cache to
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"input": "a question", "output": "an answer"}\n' * 4)
    cfg = _config(assets, tmp_path / "sft", teacher_cache_dir=str(tmp_path / "sft_cache"))
    cfg["dataset"] = {"_component_": "torchtune.datasets.instruct_dataset", "source": "json",
                      "data_files": str(rows), "split": "train"}
    line = tune.user_error("tad_cache", ["--config", str(tune.write_config(
        cfg, tmp_path / "sft.yaml"))], monkeypatch, capsys)
    assert line == ("tad_cache: error: dataset._component_: the teacher cache is aligned to the "
                    "blocks of a prepared store (tad_torchtune.data.text_block_dataset); "
                    "instruct and chat datasets train with the live teacher")
