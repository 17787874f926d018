from pathlib import Path

from omegaconf import OmegaConf

import tad_torchtune
from tad_torchtune.config_checks import resolve_config_argv, resolve_package_paths


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


def test_an_optional_component_set_to_null_on_the_command_line_is_absent():
    """``tune run tad_distill ... validation_dataset=null lr_scheduler=null``: torchtune's CLI
    sets the nodes' ``_component_`` to null; the check then drops those components."""
    from omegaconf import OmegaConf

    from tad_torchtune.config_checks import validate_config
    from tad_torchtune.demo import bundled_config

    cfg = OmegaConf.create(bundled_config("demo"))
    cfg.validation_dataset._component_ = None
    cfg.lr_scheduler._component_ = None
    validate_config(cfg)
    assert cfg.validation_dataset is None and cfg.lr_scheduler is None
    cfg.dataset._component_ = None  # a required one stays an error
    import pytest

    with pytest.raises(ValueError, match=r"^dataset._component_: must be a dotpath "
                                         r"\(package.module.name\), got None$"):
        validate_config(cfg)
