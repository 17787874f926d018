"""``tune run tad_eleuther_eval``: the components of its config build and load an exported
student, and its errors are one line (the harness run itself: ``tests/test_harness.py``)."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tad_torchtune.data import resolve_asset  # noqa: E402
from tad_torchtune.harness import TASKS_DIR  # noqa: E402
from tests.helpers import tune  # noqa: E402
from tests.helpers.teachers import save_hf_llama  # noqa: E402

DEMO = Path(resolve_asset("pkg://demo"))
# no Hub, no data set hub: everything below is local, and must stay so
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_eleuther_config_components_load(tmp_path):
    """The components of configs/eleuther_eval_student.yaml build and load an exported student
    (its checkpointer's null ``model_type`` made the family's of config.json, as the recipe's
    setup does)."""
    from omegaconf import OmegaConf
    from tad_eleuther_eval import TADEleutherEvalRecipe
    from torchtune import config, training

    student = save_hf_llama(tmp_path / "student", seed=3, tied=True)
    cfg = OmegaConf.load(Path(__file__).parents[2] / "configs" / "eleuther_eval_student.yaml")
    cfg.student_dir, cfg.output_dir = str(student), str(tmp_path / "out")
    assert cfg.checkpointer.model_type is None
    TADEleutherEvalRecipe._fit_model_type(cfg.checkpointer)
    assert cfg.checkpointer.model_type == "LLAMA3_2"  # the tied Llama family
    model = config.instantiate(cfg.model)
    model.load_state_dict(config.instantiate(cfg.checkpointer).load_checkpoint()[training.MODEL_KEY])
    tok = config.instantiate(cfg.tokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_tokens, tok.max_seq_len) == (0, 1, 2, [1], 256)
    ids = tok.encode("a kludge in the daemon", add_bos=True, add_eos=False)
    assert tok.decode(ids[1:]) == "a kludge in the daemon"
    hf = transformers.LlamaForCausalLM.from_pretrained(student).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_eleuther_recipe_errors_are_one_line(tmp_path, monkeypatch, capsys):
    """Through `tune run` once; the other message in this process (``tune.user_error``)."""
    proc = subprocess.run(
        [tune.tune_bin(), "run", "tad_eleuther_eval", "--config", "eleuther_eval_student",
         f"output_dir={tmp_path / 'out'}", f"student_dir={tmp_path / 'nowhere'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=os.environ | OFFLINE)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == (
        f"tad_eleuther_eval: error: checkpointer.checkpoint_dir: '{tmp_path / 'nowhere'}' is not a "
        "folder; give the student tad_distill exported (student_dir=OUTPUT_DIR/student)")
    assert "Traceback" not in proc.stderr
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    line = tune.user_error("tad_eleuther_eval", [
        "--config", str(tune.bundled_config_path("eleuther_eval_student")), f"output_dir={tmp_path / 'out'}", f"student_dir={DEMO / 'teacher'}",
        "tasks=[jargon_heldoot]"], monkeypatch, capsys)
    assert line == (
        f"tad_eleuther_eval: error: tasks: 'jargon_heldoot' is neither a task, group or tag of "
        f"lm_eval nor of include_path '{TASKS_DIR}', nor a task YAML file; e.g. jargon_heldout "
        "(shipped) or hellaswag; `lm_eval ls tasks` lists them")
    # a student whose vocabulary the tokenizer's ids pass (an IndexError before)
    small = save_hf_llama(tmp_path / "small_vocab", seed=0, vocab=1024)
    line = tune.user_error("tad_eleuther_eval", [
        "--config", str(tune.bundled_config_path("eleuther_eval_student")),
        f"output_dir={tmp_path / 'out'}", f"student_dir={small}", "limit=2",
        "max_seq_length=64"], monkeypatch, capsys)
    assert line.startswith("tad_eleuther_eval: error: tokenizer: the task's text holds token id ")
    assert line.endswith(", but the student's vocabulary has 1024 ids; accepted: the student's "
                         "tokenizer")


def test_the_checkpointer_s_model_type_is_config_json_s(tmp_path):
    """The model is built from config.json (``hf_decoder``); the checkpointer's ``model_type``
    converts the weights: a null one becomes config.json's family's, so a Mistral student's
    logits are transformers' (Llama's q/k permutation, which Qwen2's conversion leaves out);
    one that converts another family's weights is one line (it failed on a key, or loaded
    unpermuted q/k weights silently)."""
    from omegaconf import OmegaConf
    from tad_eleuther_eval import TADEleutherEvalRecipe
    from torchtune import config, training

    from tad_torchtune.errors import ConfigError
    from tests.helpers.teachers import save_hf_windowed

    student = save_hf_windowed(tmp_path / "student", "mistral", window=None, seed=2)
    cfg = OmegaConf.load(Path(__file__).parents[2] / "configs" / "eleuther_eval_student.yaml")
    cfg.student_dir, cfg.output_dir = str(student), str(tmp_path / "out")
    TADEleutherEvalRecipe._fit_model_type(cfg.checkpointer)
    assert cfg.checkpointer.model_type == "MISTRAL"
    model = config.instantiate(cfg.model)
    model.load_state_dict(config.instantiate(cfg.checkpointer).load_checkpoint()[training.MODEL_KEY])
    hf = transformers.AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    x = torch.randint(0, hf.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=1e-4)
    for wrong in ("QWEN2", "LLAMA3"):
        cfg.checkpointer.model_type = wrong
        with pytest.raises(ConfigError) as err:
            TADEleutherEvalRecipe._fit_model_type(cfg.checkpointer)
        assert str(err.value).startswith(f"checkpointer.model_type: {wrong} converts the weights "
                                          "of Hugging Face model_type ")
        assert str(err.value).endswith("config.json says 'mistral'; accepted for it: "
                                       "['MISTRAL']")


def test_a_training_checkpoint_and_a_window_too_long_are_refused_before_loading(tmp_path):
    """A tad_distill training checkpoint (``step_N``: no config.json) is pointed to its exports
    (before: torchtune's checkpointer stopped with ``KeyError: None``); a ``max_seq_length``
    above the student's ``max_seq_len`` is one line naming it (before: torchtune's message at
    the first request, after loading)."""
    from omegaconf import OmegaConf
    from tad_eleuther_eval import TADEleutherEvalRecipe

    from tad_torchtune.errors import ConfigError

    step = tmp_path / "out" / "checkpoints" / "step_000006"
    step.mkdir(parents=True)
    (step / "meta.pt").write_bytes(b"")
    cfg = OmegaConf.load(Path(__file__).parents[2] / "configs" / "eleuther_eval_student.yaml")
    cfg.student_dir, cfg.output_dir = str(step), str(tmp_path / "eval")
    with pytest.raises(ConfigError) as err:
        TADEleutherEvalRecipe._fit_model_type(cfg.checkpointer)
    assert str(err.value) == (
        f"checkpointer.checkpoint_dir: {str(step)!r} has no config.json; it is a tad_distill "
        f"training checkpoint (for resuming); accepted: its Hugging Face export "
        f"{str(step / 'hf')!r} (written when export_hf: true), or the run's output_dir/student")
    # another checkpointer's folder without config.json (torchtune's format): left to it
    (step / "meta.pt").unlink()
    TADEleutherEvalRecipe._fit_model_type(cfg.checkpointer)
    cfg.student_dir = str(save_hf_llama(tmp_path / "student", seed=3))  # max_seq_len 64
    cfg.max_seq_length = 64
    TADEleutherEvalRecipe._check_length(cfg)
    cfg.max_seq_length = 65
    with pytest.raises(ConfigError) as err:
        TADEleutherEvalRecipe._check_length(cfg)
    assert str(err.value) == ("max_seq_length: 65 exceeds the student's max_seq_len 64; "
                              "accepted: at most 64")


def test_a_gemma2_student_decodes_without_the_kv_cache_past_its_window(tmp_path):
    """torchtune's Gemma2 attention, decoding with a KV cache past its sliding window, attends
    to the first window of tokens (its window is built from the one-row mask's row index 0):
    the cache is turned off where lm_eval's windows are longer than the student's."""
    import json

    from omegaconf import OmegaConf
    from tad_eleuther_eval import kv_cache_keeps_the_window

    folder = tmp_path / "student"
    folder.mkdir()
    cfg = OmegaConf.create({"checkpointer": {"checkpoint_dir": str(folder)},
                            "max_seq_length": 16})
    for hf, keeps in (({"model_type": "gemma2", "sliding_window": 8}, False),
                      ({"model_type": "gemma2", "sliding_window": 16}, True),
                      ({"model_type": "gemma2", "sliding_window": None}, True),
                      ({"model_type": "mistral", "sliding_window": 8}, True)):  # its own fix
        (folder / "config.json").write_text(json.dumps(hf))
        assert kv_cache_keeps_the_window(cfg) is keeps, hf
