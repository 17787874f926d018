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
