"""The shipped configs as the tests find them: the folder, every ``tad_distill`` config in it
(a new one is tested without editing a test) and the token store's dataset builder."""

from pathlib import Path

from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
# Every shipped tad_distill config (the eval configs have no student_model).
TRAINING_CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")
                          if "student_model" in OmegaConf.load(p))
TEXT_BLOCKS = "tad_torchtune.data.text_block_dataset"
