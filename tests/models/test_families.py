"""Model families (``models/_families.py``): one ``register_family`` call is all a new family
needs, and a config.json no family can build is named."""

import json

import pytest
import torch

from tad_torchtune.models import init_student_from_teacher, pruned_student, save_hf_checkpoint
from tests.helpers.teachers import (
    ATOL,
    CASES,
    SEQ,
    VOCAB,
    hf_config,
    hf_logits,
    logits_of,
    randomize_,
)


def test_register_family_is_all_a_new_family_needs(tmp_path):
    """The documented extension step: torchtune's Gemma (v1) is not built in; one
    ``register_family`` call makes students, initialisation and export work for it."""
    from torchtune.models.gemma import gemma

    from tad_torchtune.models import FAMILIES, ModelFamily, register_family

    kwargs = dict(vocab_size=VOCAB, num_layers=4, num_heads=4, head_dim=16, num_kv_heads=1,
                  embed_dim=32, intermediate_dim=48, max_seq_len=64)
    node = {"_component_": "torchtune.models.gemma.gemma", **kwargs}
    with pytest.raises(ValueError, match="register_family"):
        pruned_student(teacher=node, num_layers=2)
    register_family(ModelFamily("gemma", "torchtune.models.gemma.gemma", "GEMMA", "gemma"))
    try:
        teacher = randomize_(gemma(**kwargs), seed=0, norm_center=0.0)
        student = pruned_student(teacher=node, num_layers=2, intermediate_dim=24)
        init_student_from_teacher(student, teacher)
        assert torch.equal(student.layers[1].attn.q_proj.weight,
                           teacher.layers[3].attn.q_proj.weight)
        base = dict(model_type="gemma", architectures=["GemmaForCausalLM"], vocab_size=VOCAB,
                    hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=1, head_dim=16, intermediate_size=48, rms_norm_eps=1e-6,
                    rope_theta=10000.0, hidden_activation="gelu_pytorch_tanh",
                    tie_word_embeddings=True, max_position_embeddings=64, pad_token_id=0)
        out = save_hf_checkpoint(student, tmp_path / "gemma", base_config=base)
        tokens = torch.randint(0, VOCAB, (2, SEQ))
        ours = logits_of(student, tokens)
        torch.testing.assert_close(hf_logits(out, tokens), ours, atol=ATOL, rtol=0)
    finally:
        FAMILIES.pop("gemma")


def test_model_from_hf_config_names_what_no_family_can_build():
    from tad_torchtune.models import model_from_hf_config

    cfg = hf_config("llama3_1")
    cfg["rope_scaling"] = dict(cfg["rope_scaling"], high_freq_factor=2.0)
    with pytest.raises(ValueError, match=r"students.x: no registered model family builds "
                                         r"model_type='llama' \(llama2: no RoPE scaling"):
        model_from_hf_config(cfg, where="students.x")
    with pytest.raises(ValueError, match=r"model_type='gpt2' \(registered model types: "):
        model_from_hf_config({"model_type": "gpt2"}, where="students.x")


def _transformers5_layout(cfg: dict) -> dict:
    """``cfg`` as transformers 5 writes a config.json: ``rope_theta``, the RoPE scaling and Phi's
    ``partial_rotary_factor`` inside ``rope_parameters``, whose ``rope_type`` is ``"default"``
    for plain RoPE; no ``rope_theta`` or ``rope_scaling`` at the top level."""
    out = dict(cfg)
    params = {"rope_theta": out.pop("rope_theta"), **(out.pop("rope_scaling", None)
                                                       or {"rope_type": "default"})}
    if "partial_rotary_factor" in out:
        params["partial_rotary_factor"] = out.pop("partial_rotary_factor")
    return {**out, "rope_parameters": params}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_config_json_written_by_transformers_5_builds_the_same_model(case, tmp_path):
    """transformers 5 moves the RoPE settings into ``rope_parameters``; a teacher saved by it
    (and every student exported from such a teacher) must build the model its Hub config.json
    builds: Llama 3.1/3.2's scaled RoPE was read as plain RoPE there before, with no error."""
    from transformers import AutoConfig

    from tad_torchtune.models import model_from_hf_config

    hub = hf_config(case)
    layouts = {"hub": hub, "transformers 5": _transformers5_layout(hub)}
    AutoConfig.for_model(**hub).save_pretrained(tmp_path)  # the installed transformers' own
    layouts["installed transformers"] = json.loads((tmp_path / "config.json").read_text())
    built = {}
    for name, cfg in layouts.items():
        with torch.device("meta"):
            _, family = model_from_hf_config(cfg)
        built[name] = family.name, family.kwargs_from_hf_config(cfg)
    assert built["transformers 5"] == built["hub"]
    assert built["installed transformers"] == built["hub"]
    if case in ("llama3_1", "llama3_2"):
        assert built["hub"][0] == CASES[case][0]
        assert built["hub"][1]["scale_factor"] == hub["rope_scaling"]["factor"]


@pytest.mark.parametrize("case", ["llama3_2", "qwen2", "mistral", "phi3", "gemma2", "phi2"])
def test_a_rope_scaling_no_builder_has_is_refused_in_either_layout(case):
    from tad_torchtune.models import model_from_hf_config

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    hub = {**hf_config(case), "rope_scaling": yarn}
    for cfg in (hub, _transformers5_layout(hub)):
        with pytest.raises(ValueError, match=r"no registered model family builds .*'yarn'"):
            model_from_hf_config(cfg)


HF_DECODER = "tad_torchtune.models.hf_decoder"


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_hf_folder_teacher_resolves_to_the_builder_its_config_json_describes(case, tmp_path):
    """``teacher_model: {_component_: tad_torchtune.models.hf_decoder, checkpoint_dir: ...}``:
    the family and builder arguments ``resolve_teacher`` reads from the folder are those of the
    teacher node written by hand for that config.json (``tests/helpers/teachers.py``), and the
    model ``build_model`` makes computes the same logits as the hand-written node's prepared with
    that config.json (Gemma2's soft-caps, Phi-3's and Mistral's sliding window: a model prepared
    without the folder's config.json would attend past the window)."""
    from tad_torchtune.models import build_model, model_from_hf_config, resolve_teacher
    from tests.helpers.teachers import teacher_node

    (tmp_path / "config.json").write_text(json.dumps(hf_config(case)))
    node = {"_component_": HF_DECODER, "checkpoint_dir": str(tmp_path)}
    family, kwargs = resolve_teacher(node)
    ref_family, ref_kwargs = resolve_teacher(teacher_node(case))
    with torch.device("meta"):  # the family any config.json loader picks (Llama 3's: llama2)
        assert family is model_from_hf_config(hf_config(case))[1]
    if family is ref_family:
        # Gemma2's two cap arguments excepted: torchtune's builder swaps them and the project's
        # correction sets both from config.json (the logits below compare what they do)
        # and the length: config.json's max_position_embeddings, where the nodes write 64
        written = {k: v for k, v in CASES[case][1].items()
                   if k not in ("hidden_capping_value", "final_capping_value", "max_seq_len")}
        assert {k: kwargs[k] for k in written} == written
        assert kwargs["max_seq_len"] == hf_config(case)["max_position_embeddings"]
        assert set(kwargs) == set(ref_kwargs)
    else:
        assert case == "llama3" and family.name == "llama2"

    ref, _ = build_model(teacher_node(case), hf_config(case))
    randomize_(ref, seed=3)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    # built alone, or handed another checkpoint's config.json (a student's is its teacher's
    # without a student_checkpointer): its own folder's config.json prepares it either way
    for other in (None, {"model_type": "llama", "sliding_window": None}):
        ours, _ = build_model(node, other)
        ours.load_state_dict(ref.state_dict())
        torch.testing.assert_close(logits_of(ours, tokens), logits_of(ref, tokens), rtol=0,
                                   atol=0)


def test_an_hf_folder_teacher_s_mistakes_are_one_line_naming_the_key(tmp_path):
    from tad_torchtune.models import resolve_teacher

    def error(node):
        with pytest.raises(ValueError) as err:
            resolve_teacher({"_component_": HF_DECODER, **node}, key="teacher_model")
        return str(err.value)

    assert error({"checkpoint_dir": str(tmp_path), "num_layers": 2}) == (
        "teacher_model.num_layers: not an argument of tad_torchtune.models.hf_decoder; "
        "accepted: checkpoint_dir (a Hugging Face checkpoint folder), max_seq_len (default: its "
        "config.json's max_position_embeddings)")
    assert error({"checkpoint_dir": None}) == error({}) == (
        "teacher_model.checkpoint_dir: missing in tad_torchtune.models.hf_decoder; accepted: "
        "checkpoint_dir (a Hugging Face checkpoint folder), max_seq_len (default: its "
        "config.json's max_position_embeddings)")
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    for bad in (0, -5, 2.5, "1024", True, 4097):
        assert error({"checkpoint_dir": str(tmp_path), "max_seq_len": bad}) == (
            f"teacher_model.max_seq_len: {bad!r}; accepted: a positive integer up to its "
            f"config.json's max_position_embeddings 4096 (the longest sequence the model "
            f"takes, its RoPE table's length), or null for its config.json's "
            f"max_position_embeddings")
    (tmp_path / "config.json").unlink()
    assert error({"checkpoint_dir": str(tmp_path)}) == (
        f"teacher_model.checkpoint_dir: {str(tmp_path)!r} has no config.json; accepted: a "
        f"Hugging Face checkpoint folder")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    assert error({"checkpoint_dir": str(tmp_path)}).startswith(
        "teacher_model.checkpoint_dir: no registered model family builds "
        "model_type='gpt_neox' (registered model types: [")


def test_an_hf_folder_model_takes_a_shorter_max_seq_len(tmp_path):
    """``hf_decoder``'s ``max_seq_len``: the model's and its RoPE table's length, what
    ``resolve_teacher`` reports (so a student pruned from it inherits it), the same logits as
    the full-length model on a sequence both take; config.json itself unchanged (an export
    writes it). A config.json edited in place is read again: the memo is by its content."""
    from tad_torchtune.models import build_model, hf_decoder, pruned_student, resolve_teacher

    case = "llama3_1"
    (tmp_path / "config.json").write_text(json.dumps(hf_config(case)))
    full_len = hf_config(case)["max_position_embeddings"]
    assert full_len > 16
    node = {"_component_": HF_DECODER, "checkpoint_dir": str(tmp_path)}
    assert resolve_teacher(node)[1]["max_seq_len"] == full_len
    assert resolve_teacher({**node, "max_seq_len": 16})[1]["max_seq_len"] == 16

    full, short = hf_decoder(str(tmp_path)), hf_decoder(str(tmp_path), max_seq_len=16)
    assert (full.max_seq_len, short.max_seq_len) == (full_len, 16)
    tables = {b.shape[0] for name, b in short.named_buffers() if name.endswith("cache")}
    assert tables == {16}
    assert short.source_hf_config == hf_config(case)
    randomize_(full, seed=1)
    short.load_state_dict(full.state_dict(), strict=False)  # the RoPE tables are not saved
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits_of(short, tokens), logits_of(full, tokens), rtol=0, atol=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        short(torch.zeros(1, 17, dtype=torch.long))

    student = pruned_student(teacher={**node, "max_seq_len": 16}, num_layers=1)
    assert student.max_seq_len == 16
    built, _ = build_model({**node, "max_seq_len": 16})
    assert built.max_seq_len == 16

    (tmp_path / "config.json").write_text(json.dumps({**hf_config(case), "num_hidden_layers": 1,
                                                      "max_position_embeddings": 32}))
    kwargs = resolve_teacher(node)[1]
    assert (kwargs["num_layers"], kwargs["max_seq_len"]) == (1, 32)


def test_a_registered_family_replaces_a_folder_s_memoised_one(tmp_path):
    """``register_family`` of a family of the same name: an ``hf_decoder`` node resolves to
    the new one, as a builder node does (the folder memo is cleared)."""
    import dataclasses

    from tad_torchtune.models import get_family, register_family, resolve_teacher

    (tmp_path / "config.json").write_text(json.dumps(hf_config("qwen2")))
    node = {"_component_": HF_DECODER, "checkpoint_dir": str(tmp_path)}
    old = resolve_teacher(node)[0]
    new = dataclasses.replace(old)
    try:
        register_family(new)
        assert resolve_teacher(node)[0] is new is get_family(old.name)
    finally:
        register_family(old)
    assert resolve_teacher(node)[0] is old
