"""The recipes' config schemas: every key checked with its name, value and what is accepted;
``pkg://`` paths and config names resolved; the README's key tables generated from them."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

import tad_torchtune
from tad_torchtune.demo import bundled_config
from tad_torchtune.schema import DISTILL, EVAL, PREPARE, resolve_config_argv, resolve_package_paths, validate_config


def test_pkg_paths_resolve_inside_the_package_and_interpolations_follow():
    cfg = OmegaConf.create({
        "teacher": {"checkpoint_dir": "pkg://demo/teacher", "alias": "${other}"},
        "other": "plain/path",
        "files": ["pkg://demo/tokenizer.json", 3],
        "mirror": "${teacher}",
    })
    resolve_package_paths(cfg)
    assets = Path(tad_torchtune.__file__).parent / "assets"
    assert cfg.teacher.checkpoint_dir == str(assets / "demo" / "teacher")
    assert cfg.teacher.alias == "plain/path"
    assert cfg.files[0] == str(assets / "demo" / "tokenizer.json") and cfg.files[1] == 3
    assert cfg.mirror.checkpoint_dir == str(assets / "demo" / "teacher")


def test_config_names_resolve_to_bundled_files(tmp_path):
    argv = resolve_config_argv(["tad_distill", "--config", "qwen2_5_3b_to_half", "seed=3"])
    assert Path(argv[2]).is_file() and argv[2].endswith("qwen2_5_3b_to_half.yaml")
    assert argv[3] == "seed=3"
    existing = tmp_path / "mine.yaml"
    existing.write_text("seed: 1\n")
    assert resolve_config_argv(["x", "--config", str(existing)])[2] == str(existing)


def test_a_folder_named_as_a_bundled_config_does_not_hide_it(tmp_path, monkeypatch):
    """``python -m tad_torchtune.demo --out demo`` makes ./demo, then runs ``--config demo``."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    argv = resolve_config_argv(["tad_distill", "--config", "demo"])
    assert Path(argv[2]).is_file() and argv[2].endswith("demo.yaml")


def test_an_unknown_config_name_lists_the_bundled_ones(capsys):
    with pytest.raises(SystemExit) as stopped:
        resolve_config_argv(["tad_distill", "--config", "no_such_config"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("--config: 'no_such_config' is neither a file nor a bundled config; "
                          "bundled: [") and "'demo'" in err


def test_an_optional_component_set_to_null_on_the_command_line_is_absent():
    """``tune run tad_distill ... validation_dataset=null lr_scheduler=null``: torchtune's CLI
    sets the nodes' ``_component_`` to null; the check then drops those components."""
    cfg = OmegaConf.create(bundled_config("demo"))
    cfg.validation_dataset._component_ = None
    cfg.lr_scheduler._component_ = None
    validate_config(cfg)
    assert cfg.validation_dataset is None and cfg.lr_scheduler is None
    cfg.dataset._component_ = None  # a required one stays an error
    with pytest.raises(ValueError, match=r"^dataset._component_: must be a dotpath "
                                         r"\(package.module.name\), got None$"):
        validate_config(cfg)


BAD = [
    ({"learning_rate": 1e-3}, "unknown top-level config key(s) ['learning_rate']"),
    ({"kd_weight": -1.0}, "kd_weight: must be >= 0, got -1.0"),
    ({"clm_weight": 0.0, "kd_weight": 0.0}, "at least one must be > 0"),
    ({"batch_size": 0}, "batch_size: must be an integer >= 1, got 0"),
    ({"gradient_accumulation_steps": "four"}, "gradient_accumulation_steps: must be int"),
    ({"dtype": "fp16"}, "dtype: must be one of ('bf16', 'fp32'), got 'fp16'"),
    ({"device": "tpu"}, "device: must be one of ('cpu', 'cuda'), got 'tpu'"),
    ({"kd_loss": {"_component_": "torch.nn.MSELoss"}}, "kd_loss._component_: 'torch.nn.MSELoss' is not a divergence"),
    ({"kd_loss": {"_component_": "tad_torchtune.losses.NoSuchLoss"}}, "kd_loss._component_: cannot import"),
    ({"kd_loss": None}, "kd_loss: missing while kd_weight > 0"),
    ({"teacher_model": None}, "teacher_model: missing"),
    ({"student_model": {"num_layers": 2}}, "student_model: must be a mapping with a `_component_`"),
    ({"vocab_alignment": "pad"}, "vocab_alignment: must be one of ('exact', 'truncate_teacher')"),
    ({"hidden_weight": 1.0}, "hidden_loss: missing while hidden_weight > 0"),
    ({"clip_grad_norm": 0}, "clip_grad_norm: must be > 0 or null"),
    ({"max_steps": 0}, "max_steps: must be an integer >= 1 or null, got 0"),
    ({"hidden_layers": [[1]]}, "hidden_layers: must be a list of [student_layer, teacher_layer]"),
    ({"fused": "yes"}, "fused: must be bool, got 'yes'"),
    ({"fused_teacher_cache_mib": -1}, "fused_teacher_cache_mib: must be >= 0"),
    ({"fused_teacher_cache_mib": "all"}, "fused_teacher_cache_mib: must be int or float or null, got 'all'"),
    ({"fused_float32_weight_grad": "no"}, "fused_float32_weight_grad: must be bool, got 'no'"),
    ({"peak_flops_per_device": -1.0}, "peak_flops_per_device: must be >= 0 or null, got -1.0"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_malformed_config_is_rejected_naming_the_field(override, message):
    cfg = OmegaConf.create({**bundled_config("demo"), **override})
    with pytest.raises(ValueError) as err:
        validate_config(cfg)
    assert message in str(err.value)


@pytest.mark.parametrize("schema,doc", [(DISTILL, "README.md"), (EVAL, "docs/design.md"),
                                        (PREPARE, "docs/design.md")],
                         ids=["tad_distill", "tad_eval", "tad_prepare"])
def test_the_documented_key_tables_are_the_schemas(schema, doc):
    """The README's table of ``tad_distill``'s keys (and design.md's of ``tad_eval``'s) is
    generated from the schema (``python -m tad_torchtune.schema``), so a key, default or doc
    changed in one place only fails here until the table is regenerated."""
    text = (Path(__file__).parents[1] / doc).read_text()
    assert schema.markdown() in text, f"{doc}: regenerate the {schema.recipe} key table"



def test_divergence_node_leaves_out_only_what_no_base_takes():
    """A swapped loss's leftovers go; a subclass passing ``**kwargs`` on to TADLoss keeps k and
    beta (they were dropped, and the run trained with TADLoss's defaults)."""
    import sys

    from omegaconf import OmegaConf

    from tad_torchtune.losses import TADLoss
    from tad_torchtune.schema import divergence_node

    class MyTAD(TADLoss):
        def __init__(self, *, extra: int = 1, **kwargs) -> None:
            super().__init__(**kwargs)
            self.extra = extra

    module = sys.modules[__name__]
    module.MyTAD = MyTAD
    mine = OmegaConf.create({"kd_loss": {"_component_": f"{__name__}.MyTAD", "k": 50,
                                         "beta": 3.0, "extra": 2}})
    node, dropped = divergence_node(mine)
    assert dropped == [] and dict(node) == dict(mine.kd_loss)
    swapped = OmegaConf.create({"kd_loss": {"_component_": "tad_torchtune.losses.ForwardKLLoss",
                                            "k": 5, "beta": 2.0, "temperature": 2.0, "kk": 1}})
    node, dropped = divergence_node(swapped)
    assert dropped == ["k", "beta"]
    assert dict(node) == {"_component_": "tad_torchtune.losses.ForwardKLLoss",
                          "temperature": 2.0, "kk": 1}
