"""benchmarks/recipe_bench.py's pieces: the peer's transformers models have the recipe's models'
sizes and frozen parameters for every architecture (the GPU pairs too, on the meta device), and
the random teacher checkpoint is a torchtune teacher's state; a row is saved before profiling."""

import json
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import recipe_bench  # noqa: E402

from tad_torchtune.models import build_model  # noqa: E402
from tests.helpers.benchmarks import main_stopped_while_profiling  # noqa: E402


def numel(params) -> int:
    return sum(p.numel() for p in params)


@pytest.mark.parametrize("arch", list(recipe_bench.ARCHS))
def test_peer_models_have_the_recipe_models_sizes(arch, tmp_path):
    """Parameters in all and trainable ones of the transformers teacher and student equal the
    torchtune models' the recipe builds; the student's embedding and output projection are one
    tensor exactly when the recipe's are tied; Gemma2 attends eagerly (it refuses sdpa)."""
    cfg = OmegaConf.create(recipe_bench.recipe_config(arch, "fused", "cpu", tmp_path,
                                                      num_blocks=2, seq=None, batch=None,
                                                      peak=None))
    peer = recipe_bench.PeerModels(cfg, torch.device("meta"), attention=None, stand_in=True)
    teacher, student = (OmegaConf.to_container(node, resolve=True)
                        for node in (cfg.teacher_model, cfg.student_model))
    with torch.device("meta"):
        tt_teacher, _ = build_model(teacher)
        tt_student, family = build_model(student)
    assert numel(peer.teacher.parameters()) == numel(tt_teacher.parameters())
    assert numel(peer.student.parameters()) == numel(tt_student.parameters())
    assert numel(peer.trainable) == numel(p for p in tt_student.parameters() if p.requires_grad)
    assert numel(peer.trainable) < numel(peer.student.parameters())  # the embedding is frozen
    tied = type(tt_student.output).__name__ == "TiedLinear"
    assert (peer.student.get_input_embeddings().weight
            is peer.student.get_output_embeddings().weight) == tied
    assert peer.attention == ("eager" if family.name == "gemma2" else "sdpa")


def test_random_checkpointer_is_a_seeded_torchtune_teacher():
    """``load_checkpoint()["model"]``: the torchtune teacher's keys and shapes, in the asked
    dtype, the same for the same seed and not for another."""
    def load(seed):
        return recipe_bench.RandomCheckpointer(
            arch="tiny_gemma2", dtype="bf16", device="cpu", seed=seed, checkpoint_dir="unused",
            model_type="GEMMA2").load_checkpoint()["model"]

    teacher, _, _ = recipe_bench.arch_nodes("tiny_gemma2")
    with torch.device("meta"):
        want = build_model(teacher)[0].state_dict()
    got, again, other = load(0), load(0), load(1)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    assert all(v.dtype == torch.bfloat16 for v in got.values())
    assert all(torch.equal(got[k], again[k]) for k in got)
    assert not torch.equal(got["layers.0.attn.q_proj.weight"],
                           other["layers.0.attn.q_proj.weight"])


@pytest.mark.parametrize("arch", [a for a, x in recipe_bench.ARCHS.items()
                                  if "config" in x or "head_of" in x])
def test_the_head_runs_as_the_shipped_config_sets_it(arch, tmp_path):
    """The GPU pairs, and the dry run's stand-ins for them, run the fused head with their shipped
    config's chunk, teacher cache and weight-gradient sum (TAD's configs keep a row of teacher
    projections: ``fused_teacher_cache_mib: null``), and the recipe's schema accepts them."""
    from tad_torchtune.demo import bundled_config
    from tad_torchtune.schema import validate_config

    spec = recipe_bench.ARCHS[arch]
    shipped = bundled_config(spec.get("config") or spec["head_of"])
    cfg = recipe_bench.recipe_config(arch, "fused_compiled", "cpu", tmp_path, num_blocks=2,
                                     seq=None, batch=None, peak=None)
    for key in recipe_bench.loss_bench.HEAD_KEYS:
        assert cfg[key] == shipped[key], key
    assert cfg["fused_teacher_cache_mib"] is None
    validate_config(OmegaConf.create(cfg))


def test_a_row_is_saved_before_its_loops_are_profiled(tmp_path, monkeypatch):
    """A run stopped while profiling (the GPU check's step cap) keeps the row it measured."""
    out = tmp_path / "rows.json"
    main_stopped_while_profiling(recipe_bench, [
        "recipe_bench.py", "--device", "cpu", "--archs", "demo", "--variants", "fused",
        "--loops", "--steps", "1", "--warmup", "0", "--batch", "2", "--seq", "32", "--profile",
        "--json", str(out)], monkeypatch)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["arch"] == "demo" and list(row["loops"]) == ["recipe"] and "profiles" not in row
    assert row["loops"]["recipe"]["tokens_per_second"] > 0


class _AsUnderCuda(torch.overrides.TorchFunctionMode):
    """What ``torch.device("cuda")`` changes for a set-up, on a CPU: a factory call that names
    no device lands on the GPU, where CUDA refuses to fill it from a CPU generator."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        from torch.utils._device import _device_constructors

        kwargs = kwargs or {}
        generator = kwargs.get("generator")
        if (func in _device_constructors() and kwargs.get("device") is None
                and generator is not None and generator.device.type == "cpu"):
            raise RuntimeError("Expected a 'cuda' device type for generator but found 'cpu'")
        return func(*args, **kwargs)


@pytest.mark.parametrize("arch", ["tiny_qwen2", "tiny_gemma2"])
def test_the_recipe_sets_up_as_under_a_cuda_default_device(arch, tmp_path):
    """recipe_bench sets the recipe up under ``torch.device(dev)``; on a GPU, the divergence's
    contract probe drew from a CPU generator into CUDA tensors and the GPU check's two recipe
    steps failed at set-up, which the dry run (``torch.device("cpu")``) could not show."""
    sys.path.insert(0, str(ROOT / "recipes"))
    import tad_distill

    cfg = OmegaConf.create(recipe_bench.recipe_config(arch, "fused_compiled", "cpu", tmp_path,
                                                      num_blocks=8, seq=None, batch=None,
                                                      peak=1e12))
    recipe = tad_distill.TADDistillRecipe(cfg)
    recipe_bench.loss_bench.set_compile_backend("eager")
    try:
        with _AsUnderCuda():
            recipe.setup(cfg)
    finally:
        recipe.cleanup()
        recipe_bench.loss_bench.set_compile_backend("inductor")
