"""The paper configs in configs/: every component builds (models scaled down, no download) and
``tune validate`` accepts the file; every shipped pretraining config reads its text through the
token store and every GPU config runs the fused head."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torchtune import config as tt_config

from tad_torchtune.losses import Divergence, HiddenCosineLoss
from tad_torchtune.models import (
    check_vocab_compat,
    correct_gemma2,
    init_student_from_teacher,
    output_weight,
    resolve_teacher,
)
from tests.helpers.configs import CONFIG_DIR, TEXT_BLOCKS, TRAINING_CONFIGS
from tests.helpers.teachers import shrink_config as _tiny  # every width / 16, depths and heads kept

PAPER_CONFIGS = [
    "qwen1_5_1_8b_to_1_2b",
    "qwen1_5_1_8b_to_0_5b",
    "qwen2_5_3b_to_half",
    "qwen2_5_3b_to_half_fkl",
    "qwen2_5_3b_to_half_rkl",
    "qwen2_5_3b_to_half_drkl",
    "gemma2_9b_to_third",
    "phi3_mini_to_tinyllama_cpt",
    "phi3_mini_to_tinyllama_sft",
    "phi3_medium_to_llama2_7b_sft",
    "phi2_to_1b",
    "phi2_to_1b_fkl",
]
# The paper's Appendix B: (learning rate, sequences per optimizer step, GPUs).
PAPER_SETUP = {
    "qwen1_5_1_8b_to_1_2b": (1e-4, 128, 1),
    "qwen1_5_1_8b_to_0_5b": (1e-4, 128, 1),
    "qwen2_5_3b_to_half": (1e-4, 128, 1),
    "qwen2_5_3b_to_half_fkl": (1e-4, 128, 1),
    "qwen2_5_3b_to_half_rkl": (1e-4, 128, 1),
    "qwen2_5_3b_to_half_drkl": (1e-4, 128, 1),
    "gemma2_9b_to_third": (1e-4, 128, 2),
    "phi3_mini_to_tinyllama_cpt": (3e-5, 128, 1),
    "phi3_mini_to_tinyllama_sft": (1e-5, 32, 1),
    "phi3_medium_to_llama2_7b_sft": (1e-5, 32, 2),
    "phi2_to_1b": (1e-4, 128, 1),
    "phi2_to_1b_fkl": (1e-4, 128, 1),
}
# The one exception to the token store: supervised distillation on instruction data (prompt
# masking, small data) through torchtune's instruct / chat builders. Both lists are explicit, so a
# new config is classified deliberately: a pretraining config on any other builder fails below.
SFT_BUILDERS = frozenset({
    "torchtune.datasets.instruct_dataset",
    "torchtune.datasets.chat_dataset",
    "torchtune.datasets.SFTDataset",
})
SFT_CONFIGS = frozenset({"phi3_mini_to_tinyllama_sft", "phi3_medium_to_llama2_7b_sft"})
def _load(name: str):
    return OmegaConf.load(CONFIG_DIR / f"{name}.yaml")


def test_every_paper_config_is_shipped_and_listed():
    shipped = {p.stem for p in CONFIG_DIR.glob("*.yaml")}
    assert set(PAPER_CONFIGS) <= shipped and set(PAPER_SETUP) == set(PAPER_CONFIGS)


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_header_documents_the_run(name):
    text = (CONFIG_DIR / f"{name}.yaml").read_text()
    header = text[: text.index("\noutput_dir:")]
    assert all(line.startswith("#") or not line.strip() for line in header.splitlines())
    for needed in ("Reproduces:", "tune download", "Data:", "Hardware:", "tune run"):
        assert needed in header, needed
    if name.startswith("gemma2"):
        assert "2 x 80 GB" in header and "Memory estimate" in header


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_hyperparameters(name):
    cfg = _load(name)
    lr, sequences, gpus = PAPER_SETUP[name]
    assert cfg.optimizer.lr == lr and cfg.optimizer.weight_decay == 0.1
    assert cfg.batch_size * cfg.gradient_accumulation_steps * gpus == sequences
    assert (f"--nproc_per_node {gpus}" in (CONFIG_DIR / f"{name}.yaml").read_text()) == (gpus > 1)
    if cfg.kd_loss._component_.endswith("TADLoss"):
        assert (cfg.kd_loss.k, cfg.kd_loss.beta) == (10, 2.0)
    # the paper's context size, set on the tokenizer or the token store's blocks (or both)
    context = [node.max_seq_len for node in (cfg.tokenizer, cfg.dataset) if "max_seq_len" in node]
    assert context and set(context) == {2048}


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_config_components_build_at_tiny_size(name, tmp_path):
    real = _load(name)
    # vocabulary sizes of the real models agree under the config's alignment
    t_family, t_kwargs = resolve_teacher(real.teacher_model)
    if real.student_model._component_ == "tad_torchtune.models.pruned_student":
        s_vocab = t_kwargs["vocab_size"]
    else:
        s_vocab = resolve_teacher(real.student_model)[1]["vocab_size"]
    check_vocab_compat(t_kwargs["vocab_size"], s_vocab, real.vocab_alignment)

    cfg = _tiny(real)
    torch.manual_seed(0)
    teacher = correct_gemma2(tt_config.instantiate(cfg.teacher_model))
    student = tt_config.instantiate(cfg.student_model)
    if hasattr(student, "distill_spec"):
        assert student.distill_spec.family == t_family.name
        init_student_from_teacher(student, teacher)
        assert len(student.layers) == cfg.student_model.num_layers < len(teacher.layers) or (
            len(student.layers) == len(teacher.layers) and name.startswith("qwen1_5")
        )
        assert not student.tok_embeddings.weight.requires_grad
    check_vocab_compat(output_weight(teacher).shape[0], output_weight(student).shape[0],
                       cfg.vocab_alignment)
    kd = tt_config.instantiate(cfg.kd_loss)
    assert isinstance(kd, Divergence)
    if cfg.get("hidden_loss") is not None:
        assert isinstance(tt_config.instantiate(cfg.hidden_loss), HiddenCosineLoss)
        assert student.tok_embeddings.embedding_dim == teacher.tok_embeddings.embedding_dim
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = tt_config.instantiate(cfg.optimizer, trainable)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["weight_decay"] == 0.1  # the paper's, in every setup
    scheduler = tt_config.instantiate(cfg.lr_scheduler, optimizer, num_training_steps=1000)
    assert scheduler.get_last_lr()[0] == 0.0  # warmup starts from zero
    assert cfg.lr_scheduler.num_warmup_steps < (cfg.max_steps or 10**9)
    cfg.output_dir = str(tmp_path)
    logger = tt_config.instantiate(cfg.metric_logger)
    assert Path(logger.path_to_log_file()).parent == tmp_path / "logs"
    logger.close()

    # the recipe's own checks, when the recipe package is present (device forced to cpu here)
    try:
        from tad_torchtune.schema import validate_config
    except ImportError:
        return
    real.device = "cpu"
    validate_config(real)


_VALIDATE_ALL = """
import sys
from torchtune._cli.tune import main
for path in sys.argv[1:]:
    sys.argv = ["tune", "validate", path]
    try:
        main()
    except SystemExit as e:
        print(f"FAILED {path}: exit {e.code}")
"""


def test_tune_validate_accepts_every_config():
    """``tune validate`` through torchtune's CLI entry point (what the ``tune`` script runs), all
    files in one interpreter: a process per file costs ~15 s of imports each."""
    paths = [str(CONFIG_DIR / f"{name}.yaml") for name in PAPER_CONFIGS]
    result = subprocess.run([sys.executable, "-c", _VALIDATE_ALL, *paths],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "FAILED" not in result.stdout, result.stdout + result.stderr
    assert result.stdout.count("Config is well-formed!") == len(paths), result.stdout


def test_tune_validate_rejects_a_broken_config():
    """The check above can fail: a misspelled argument of the student builder is reported."""
    from torchtune.config._errors import ConfigError
    from torchtune.config._validate import validate

    cfg = _load("qwen2_5_3b_to_half")
    validate(cfg)
    cfg.student_model.num_layayers = cfg.student_model.pop("num_layers")
    # torchtune 0.6.1 raises a bare TypeError here rather than its ConfigError
    with pytest.raises((ConfigError, TypeError), match="num_layayers"):
        validate(cfg)


def data_rule_violations(name: str, cfg) -> list[str]:
    """What breaks the rule "a shipped pretraining config reads its text (``dataset`` and
    ``validation_dataset``) through ``text_block_dataset``; only the configs of ``SFT_CONFIGS``
    read theirs with a builder of ``SFT_BUILDERS``" (empty when nothing does)."""
    builders = {key: cfg[key].get("_component_") for key in ("dataset", "validation_dataset")
                if cfg.get(key) is not None}
    sft = builders.get("dataset") in SFT_BUILDERS
    problems = []
    if sft != (name in SFT_CONFIGS):
        problems.append(
            f"{name}: dataset {builders.get('dataset')!r} but the config is "
            f"{'not ' if name not in SFT_CONFIGS else ''}in SFT_CONFIGS: a pretraining config reads "
            f"{TEXT_BLOCKS}, an SFT config one of {sorted(SFT_BUILDERS)} and is listed there"
        )
    allowed = SFT_BUILDERS if name in SFT_CONFIGS else {TEXT_BLOCKS}
    problems += [f"{name}: {key}._component_ is {builder!r}, accepted: {sorted(allowed)}"
                 for key, builder in builders.items() if builder not in allowed]
    return problems


def fused_rule_violations(name: str, cfg) -> list[str]:
    """A GPU config (``device: cuda``) without ``fused: true`` (empty when it has it)."""
    if cfg.get("device") == "cuda" and cfg.get("fused") is not True:
        return [f"{name}: device cuda with fused {cfg.get('fused', 'absent')!r}; GPU configs run "
                "the fused head (fused: true)"]
    return []


def test_training_configs_are_found():
    # the rules below are not vacuous: every paper config and the demo are training configs
    assert set(PAPER_CONFIGS) | {"demo"} <= set(TRAINING_CONFIGS)
    assert SFT_CONFIGS <= set(TRAINING_CONFIGS)


@pytest.mark.parametrize("name", TRAINING_CONFIGS)
def test_pretraining_configs_read_the_token_store(name):
    assert data_rule_violations(name, _load(name)) == []


@pytest.mark.parametrize("name", TRAINING_CONFIGS)
def test_gpu_configs_run_the_fused_head(name):
    assert fused_rule_violations(name, _load(name)) == []


def test_the_config_rules_catch_what_they_forbid():
    """Each way of breaking the two rules is reported (what the two tests above would fail on)."""
    def broken(name, edit):
        cfg = _load(name)
        edit(cfg)
        return data_rule_violations(name, cfg) + fused_rule_violations(name, cfg)

    in_memory = {"_component_": "torchtune.datasets.text_completion_dataset", "source": "parquet",
                 "data_files": "/data/*.parquet", "packed": True}
    instruct = {"_component_": "torchtune.datasets.instruct_dataset", "source": "json"}
    name = "qwen2_5_3b_to_half"
    assert broken(name, lambda c: None) == []
    assert len(broken(name, lambda c: c.update(dataset=in_memory))) == 1
    assert len(broken(name, lambda c: c.update(validation_dataset=in_memory))) == 1
    # an SFT builder in a config not listed as SFT: both the classification and the builder
    assert len(broken(name, lambda c: c.update(dataset=instruct))) == 2
    assert len(broken(name, lambda c: c.update(fused=False))) == 1
    assert len(broken(name, lambda c: c.pop("fused"))) == 1
    assert broken(name, lambda c: c.update(fused=False, device="cpu")) == []
    sft = "phi3_mini_to_tinyllama_sft"
    assert broken(sft, lambda c: None) == []
    assert len(broken(sft, lambda c: c.update(validation_dataset=in_memory))) == 1
    # a new instruction-data config, not yet listed as SFT: its class and both its builders
    problems = data_rule_violations("a_new_sft_config", _load(sft))
    assert len(problems) == 3 and "not in SFT_CONFIGS" in problems[0]


PRETRAINING_CONFIGS = [n for n in TRAINING_CONFIGS if n not in SFT_CONFIGS]


@pytest.mark.parametrize("name", PRETRAINING_CONFIGS)
def test_pretraining_datasets_build_on_a_small_corpus(name):
    """The dataset nodes as shipped, only the source swapped for the bundled corpus (tokenized by
    the demo tokenizer): ``text_block_dataset`` takes every key (``tune validate`` cannot tell,
    the builder takes ``**kwargs``) and cuts blocks of the tokenizer's context size."""
    from tad_torchtune.demo import demo_tokenizer

    cfg = _load(name)
    tokenizer = demo_tokenizer()
    context = cfg.tokenizer.get("max_seq_len", cfg.dataset.max_seq_len)
    for key in ("dataset", "validation_dataset"):
        node = OmegaConf.to_container(cfg[key])
        node["source"] = "pkg://demo/jargon.jsonl.gz"
        dataset = tt_config.instantiate(OmegaConf.create(node), tokenizer)
        assert len(dataset) > 0
        assert dataset[len(dataset) - 1]["tokens"].shape == (context,)


# --------------------------------------------------------------------------------------------
# Phi-2 -> 1.1B (Table 4): the real sizes, built on the meta device (nothing allocated).

PHI2_TEACHER_PARAMS = 2_779_683_840  # microsoft/phi-2's safetensors hold this many
PHI2_STUDENT_PARAMS = 1_101_429_760
PHI2_STUDENT_FROZEN = 262_195_200  # 51200 x 2560 embedding, output projection and its bias


@pytest.mark.parametrize("name", ["phi2_to_1b", "phi2_to_1b_fkl"])
def test_phi2_config_builds_the_stated_sizes_on_meta(name):
    cfg = _load(name)
    with torch.device("meta"):
        teacher = tt_config.instantiate(cfg.teacher_model)
        student = tt_config.instantiate(cfg.student_model)
    assert sum(p.numel() for p in teacher.parameters()) == PHI2_TEACHER_PARAMS
    attn = teacher.layers[0].attn
    sizes = (len(teacher.layers), attn.embed_dim, attn.num_heads, attn.head_dim)
    assert sizes == (32, 2560, 32, 80)
    assert attn.pos_embeddings.rotary_dim == 32 and teacher.output.bias.shape == (51200,)
    assert teacher.layers[0].mlp.w1.out_features == 10240

    assert len(student.layers) == 16 and student.layers[0].mlp.w1.out_features == 5120
    assert student.distill_spec.teacher_layers == (0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25,
                                                   27, 29, 31)
    total = sum(p.numel() for p in student.parameters())
    frozen = sum(p.numel() for p in student.parameters() if not p.requires_grad)
    assert (total, frozen) == (PHI2_STUDENT_PARAMS, PHI2_STUDENT_FROZEN)
    # the header states these counts
    header = (CONFIG_DIR / f"{name}.yaml").read_text()
    for stated in (f"{PHI2_TEACHER_PARAMS / 1e9:.2f}B parameters",
                   f"{(total - frozen) / 1e9:.2f}B trainable",
                   f"({total:,} total - {frozen:,} frozen", "exactly 1.10B parameters"):
        assert stated in header, stated


def test_phi2_tokenizer_node_feeds_the_token_store(tmp_path):
    """The config's tokenizer (torchtune's HuggingFaceBaseTokenizer on a tokenizer.json) with a
    byte-level BPE built like Phi-2's (CodeGen/GPT-2: <|endoftext|> as BOS and EOS, nothing
    added by the post-processor) and the config's dataset node, on a small JSONL corpus."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog."]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "add_bos_token": False,
         "tokenizer_class": "CodeGenTokenizer"}))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in text * 30))

    cfg = _load("phi2_to_1b")
    cfg.tokenizer.tokenizer_json_path = str(tmp_path / "tokenizer.json")
    cfg.tokenizer.tokenizer_config_json_path = str(tmp_path / "tokenizer_config.json")
    tokenizer = tt_config.instantiate(cfg.tokenizer)
    eot = tok.token_to_id("<|endoftext|>")
    assert (tokenizer.bos_id, tokenizer.eos_id) == (eot, eot)
    ids = tokenizer.encode(text[0], add_bos=True, add_eos=True)
    assert ids == [eot, *tok.encode(text[0]).ids, eot]
    assert tokenizer.decode(ids[1:-1]) == text[0]

    node = cfg.dataset
    node.source, node.max_seq_len, node.store_dir = str(corpus), 32, str(tmp_path / "stores")
    dataset = tt_config.instantiate(node, tokenizer)
    first = dataset[0]["tokens"].tolist()
    assert first[: len(ids)] == ids  # the stream starts with the first document as encoded
