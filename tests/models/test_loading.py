"""Loading a checkpoint into a model (``models/loading.py``): any exported folder of a registered
family is rebuilt from its config.json alone, with the student's exact logits."""

import pytest
import torch

from tad_torchtune.models import init_student_from_teacher, pruned_student, save_hf_checkpoint
from tests.helpers.teachers import (
    CASES,
    SEQ,
    VOCAB,
    build_teacher,
    logits_of,
    one_rank_process_group,
    save_teacher_hf,
    teacher_node,
    teacher_via_checkpointer,
)


@pytest.mark.parametrize("case", sorted(CASES))
def test_tad_eval_builds_every_family_from_config_json_alone(case, tmp_path):
    """An exported student of every family is rebuilt by ``tad_eval`` from its folder alone
    (the family read from config.json, its conversion loading the weights), with the
    student's exact logits."""
    from tad_torchtune.models import load_hf_folder

    teacher, teacher_dir = teacher_via_checkpointer(case, tmp_path)
    torch.manual_seed(0)
    student = pruned_student(teacher=teacher_node(case), num_layers=2, intermediate_dim=24,
                             mlp_init="copy")
    init_student_from_teacher(student, teacher)
    out = save_hf_checkpoint(student, tmp_path / "student", base_config=teacher_dir)
    model = load_hf_folder(out, where="students.s", device=torch.device("cpu"),
                           dtype=torch.float32)
    assert type(model.layers[0]) is type(student.layers[0])
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    ours, rebuilt = logits_of(student, tokens), logits_of(model, tokens)
    assert ours.abs().max() > 1.0
    torch.testing.assert_close(rebuilt, ours, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_load_teacher_builds_nothing_random_and_equals_a_build_then_load(case, dtype, tmp_path):
    """``load_teacher`` builds on the meta device and loads after (``load_weights``): the same
    parameters, buffers (RoPE caches rebuilt by ``rope_init``), dtypes and logits, bit for bit,
    as building the model in ``dtype`` and loading the checkpoint into it; and no random numbers
    drawn (a build on the host would initialise every weight from the global generator)."""
    from omegaconf import OmegaConf
    from torchtune import training

    from tad_torchtune.models import build_model
    from tad_torchtune.models.loading import load_teacher

    state = build_teacher(case, seed=1).state_dict()
    node = OmegaConf.create(teacher_node(case))
    ckpt = OmegaConf.create({"checkpoint_dir": str(tmp_path)})  # no config.json: no fix-up input
    with training.set_default_dtype(dtype):
        reference, _ = build_model(node)
    reference.load_state_dict(state)
    reference.eval()
    torch.manual_seed(0)
    rng = torch.get_rng_state()
    teacher = load_teacher(node, ckpt, device=torch.device("cpu"), dtype=dtype, state=state)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    ours = dict(teacher.state_dict(keep_vars=True), **dict(teacher.named_buffers()))
    theirs = dict(reference.state_dict(keep_vars=True), **dict(reference.named_buffers()))
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), name
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(teacher(tokens), reference(tokens))


def test_load_weights_reports_what_does_not_fit():
    """Strict as ``load_state_dict``: a missing, an unexpected and a misshapen weight are each
    named; a weight that fits is loaded contiguous whatever the checkpoint tensor's layout."""
    from omegaconf import OmegaConf

    from tad_torchtune.models import build_model
    from tad_torchtune.models.loading import load_weights

    state = build_teacher("llama3").state_dict()

    def load(sd):
        with torch.device("meta"):
            model, _ = build_model(OmegaConf.create(teacher_node("llama3")))
        load_weights(model, sd, device=torch.device("cpu"), dtype=torch.float32,
                     where="teacher_checkpointer")

    # a non-contiguous checkpoint tensor (a converted view) becomes a contiguous parameter
    square = state["layers.0.attn.q_proj.weight"]
    with torch.device("meta"):
        model, _ = build_model(OmegaConf.create(teacher_node("llama3")))
    view = square.t().contiguous().t()
    assert not view.is_contiguous()
    load_weights(model, {**state, "layers.0.attn.q_proj.weight": view},
                 device=torch.device("cpu"), dtype=torch.float32)
    loaded = model.layers[0].attn.q_proj.weight
    assert loaded.is_contiguous() and torch.equal(loaded, square)

    # one line naming the checkpoint's key and what does not fit, before any weight is placed
    from tad_torchtune.errors import ConfigError

    start = "teacher_checkpointer: the checkpoint does not fit the model built for it ("
    end = "); the model's arguments must be those of the checkpoint's config.json"
    missing = {k: v for k, v in state.items() if k != "norm.scale"}
    with pytest.raises(ConfigError) as err:
        load(missing)
    assert str(err.value) == f"{start}1 missing: norm.scale{end}"
    with pytest.raises(ConfigError) as err:
        load({**state, **{f"extra{i}.weight": torch.zeros(2) for i in range(5)}})
    assert str(err.value) == (f"{start}5 unexpected: extra0.weight, extra1.weight, extra2.weight "
                              f"and 2 more{end}")
    with pytest.raises(ConfigError) as err:
        load({**state, "output.weight": state["output.weight"][:-1]})
    assert str(err.value) == (f"{start}1 of another shape: output.weight ({VOCAB - 1}, 32) in "
                              f"the checkpoint, ({VOCAB}, 32) in the model{end}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_familys_builder_fits_its_own_checkpoint_and_a_changed_one_does_not(case, tmp_path):
    """``check_model_fits_checkpoint`` passes every family's teacher node against its own Hub
    folder with its family's checkpointer model type, and names a changed RoPE base, a changed
    head count and another family's model type, each before anything is read."""
    from omegaconf import OmegaConf

    from tad_torchtune.errors import ConfigError
    from tad_torchtune.models import FAMILIES
    from tad_torchtune.models.loading import check_model_fits_checkpoint

    family = FAMILIES[CASES[case][0]]
    folder = save_teacher_hf(case, build_teacher(case), tmp_path / "teacher")
    ckpt = {"checkpoint_dir": str(folder), "model_type": family.checkpointer_model_type}

    def check(node=None, **changes):
        check_model_fits_checkpoint(OmegaConf.create(node or teacher_node(case)),
                                    OmegaConf.create({**ckpt, **changes}),
                                    model_key="teacher_model", checkpointer_key="teacher_ckpt")

    check()
    with pytest.raises(ConfigError, match=r"^teacher_model.rope_base: .* builds rope_base=1234.0, "
                                          r"but .*config.json gives "):
        check({**teacher_node(case), "rope_base": 1234.0})
    with pytest.raises(ConfigError, match=r"^teacher_model.num_heads: .* builds num_heads=2, but "
                                          r".*config.json gives 4: the model must be the "):
        check({**teacher_node(case), "num_heads": 2, "num_kv_heads": 2})
    other = "QWEN2" if family.hf_model_type != "qwen2" else "GEMMA2"
    with pytest.raises(ConfigError, match=rf"^teacher_ckpt.model_type: {other} converts the "
                                          rf"weights of Hugging Face model_type "):
        check(model_type=other)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["every", "from_rank0"])
def test_two_ranks_receive_only_their_shards(tmp_path, mode):
    """On two processes the teacher is sharded on the meta device and each rank then receives
    its slice of every sharded weight (the one ``distribute_tensor`` cuts, uneven splits
    included), half the weights in all, and computes the unsharded model's logits: from a
    checkpoint every rank holds, or (``from_rank0``) one rank 0 alone holds and broadcasts.
    ``on_rank0`` gives rank 0 its result, every rank the shared value, and raises rank 0's
    error on every rank: on rank 0 itself, elsewhere as ``ReportedElsewhere`` (printed by rank
    0 alone) with its message and the exit status of a user's error (2) or another (1)."""
    from pathlib import Path

    from tests.helpers.tune import two_ranks

    _, ranks = two_ranks(Path(__file__).parents[1] / "helpers" / "load_sharded.py",
                         ["qwen2", tmp_path, tmp_path, mode], cwd=tmp_path)
    for rank, got in enumerate(ranks):
        assert not got["drew_random_numbers"] and not got["requires_grad"]
        assert got["shards"] and all(got["shards"].values()), got["shards"]
        assert got["uneven"] == {"1": True, "3": True, "3t": True}
        assert got["logits_max_diff"] < 1e-5
        assert got["on_rank0"] == {
            "result": {"rank": 0} if rank == 0 else None, "shared": 10,
            "errors": {  # rank 0's own; elsewhere, exit statuses of a user's error and a bug
                "user": "ValueError: teacher_checkpointer.checkpoint_files: truncated"
                if rank == 0 else "ReportedElsewhere: rank 0 failed: "
                                  "teacher_checkpointer.checkpoint_files: truncated (status 2)",
                "other": "KeyError: 'x'" if rank == 0 else "ReportedElsewhere: rank 0 failed: "
                                                          "KeyError: 'x' (status 1)"}}
    assert ranks[0]["whole"] == ranks[1]["whole"] == 2 * ranks[0]["local"] == 2 * ranks[1]["local"]


def test_one_rank_loads_its_shards_and_trains(tmp_path, monkeypatch):
    """The sharded loading on the CPU (gloo; CPU offload needs a GPU: tests/test_cuda.py)."""
    from tests.helpers.teachers import check_sharded_loading

    check_sharded_loading("cpu", "gloo", False, tmp_path, monkeypatch)


def test_a_broadcast_holds_one_whole_tensor_at_a_time(tmp_path, monkeypatch):
    """``load_weights(from_rank0=True)`` keeps no broadcast whole tensor of a sharded weight
    alive once its shard is cut: when the next is broadcast, the previous one is gone (a
    float32 256K-vocabulary embedding is 3.7 GB on a GPU); only those that become a weight FSDP
    does not shard (the frozen teacher's embedding) stay. One gloo rank; the float32 checkpoint
    converted to bf16 on the way, so each whole tensor is the loader's own."""
    import gc
    import weakref
    from functools import partial

    import torch.distributed as dist
    from omegaconf import OmegaConf
    from torch.distributed.tensor import DTensor

    from tad_torchtune.models.loading import load_teacher
    from tad_torchtune.parallel import parallelize

    with one_rank_process_group("gloo", monkeypatch):
        sent, alive = [], set()
        broadcast = dist.broadcast

        def spy(tensor, src):
            gc.collect()
            alive.update(t.data_ptr() for t in (ref() for ref in sent) if t is not None)
            sent.append(weakref.ref(tensor))
            return broadcast(tensor, src)

        monkeypatch.setattr(dist, "broadcast", spy)
        teacher = load_teacher(OmegaConf.create(teacher_node("qwen2")),
                               OmegaConf.create({"checkpoint_dir": str(tmp_path)}),
                               device=torch.device("cpu"), dtype=torch.bfloat16,
                               state=build_teacher("qwen2").state_dict(), from_rank0=True,
                               prepare=partial(parallelize, fsdp=True))
        whole = {p.data_ptr() for p in teacher.parameters() if not isinstance(p, DTensor)}
        assert len(sent) > 10 and whole and alive <= whole, (len(alive), len(whole))
