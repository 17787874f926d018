"""Build the bundled demo assets in ``tad_torchtune/assets/demo/`` (corpus, tokenizer, teacher).

    python scripts/build_demo_assets.py                    # fetches jargon-text with apt-get
    python scripts/build_demo_assets.py --jargon jargon.txt.gz --steps 600

What it does, in order (each step feeds the next):

1. Corpus: the Jargon File 4.4.7 (public domain) from Debian's ``jargon-text`` package, fetched
   with ``apt-get download`` + ``dpkg -x`` unless ``--jargon`` names the ``jargon.txt[.gz]``.
   Paragraphs are re-flowed onto one line; a document is one lexicon entry (its headword and
   senses) or, outside the lexicon, consecutive paragraphs up to ~1500 characters.
2. Split: a document is held out iff ``zlib.crc32(doc.encode("utf-8")) % 15 == 0`` (about 7% of
   the tokens). ``jargon.jsonl.gz`` holds one ``{"text": doc}`` per line, UTF-8, the training
   documents first (in the File's order), then the held-out ones, so that "the last 5% of the
   token stream" (``tad_torchtune.data.TextBlockDataset(validation_fraction=0.05)``) lies inside
   text the teacher never saw. gzip mtime 0: the file is reproducible byte for byte. The
   held-out documents alone also go to ``tad_torchtune/assets/lm_eval/jargon_heldout.jsonl``, the
   data of the shipped lm-evaluation-harness task (``--tasks-out``).
3. Tokenizer: byte-level BPE (``tokenizers``), 2048 ids, trained on the training documents only.
   Special tokens ``<|begin_of_text|>`` (0), ``<|end_of_text|>`` (1), ``<|pad|>`` (2).
4. Teacher: torchtune ``llama3`` decoder (4 layers, 192 wide, 4 heads, 2 KV heads), trained with
   plain cross-entropy on packed 256-token windows of the training split (BOS + doc + EOS,
   concatenated), AdamW, warm-up then cosine decay, on at most 2 CPU threads.
5. Export: ``convert_weights.tune_to_hf`` -> ``teacher/model.safetensors`` (bf16) +
   ``teacher/config.json`` (``LlamaForCausalLM``) + a copy of the tokenizer files, so that the
   folder (and every student ``tad_distill`` exports from it, which copies them) opens with
   ``transformers.AutoModelForCausalLM`` and ``AutoTokenizer`` alone; checked to load through
   torchtune's ``FullModelHFCheckpointer`` and, when installed, ``transformers`` with matching
   logits and the same token ids as the torchtune tokenizer.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tad_torchtune" / "assets" / "demo"
DEFAULT_TASKS_OUT = REPO / "tad_torchtune" / "assets" / "lm_eval"

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
VOCAB_SIZE = 2048
MAX_SEQ_LEN = 256
TEACHER_KWARGS = dict(
    vocab_size=VOCAB_SIZE,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=192,
    intermediate_dim=512,
    max_seq_len=MAX_SEQ_LEN,
    rope_base=500_000,
    norm_eps=1e-5,
)


# ----------------------------------------------------------------------------------------- corpus
def fetch_jargon(workdir: Path) -> Path:
    """``apt-get download jargon-text`` and unpack it without installing; returns jargon.txt.gz."""
    subprocess.run(["apt-get", "download", "jargon-text"], cwd=workdir, check=True)
    deb = next(workdir.glob("jargon-text_*.deb"))
    subprocess.run(["dpkg", "-x", str(deb), str(workdir / "x")], check=True)
    return workdir / "x" / "usr" / "share" / "doc" / "jargon-text" / "jargon.txt.gz"


def read_text(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8")


HEADWORD = re.compile(r"^:[^:]+:")  # lexicon entries start with ":headword: pos."


def documents(text: str, max_chars: int = 1500) -> list[str]:
    """Re-flow paragraphs and group them into documents (see the module docstring)."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        para = " ".join(line.strip() for line in block.splitlines() if line.strip())
        # drop rules made of box-drawing characters and empty blocks
        if para and not set(para) <= set("═─━ "):
            paragraphs.append(para)
    docs: list[str] = []
    current: list[str] = []
    for para in paragraphs:
        if current and (HEADWORD.match(para) or sum(map(len, current)) >= max_chars):
            docs.append(" ".join(current))
            current = []
        current.append(para)
    if current:
        docs.append(" ".join(current))
    return docs


def is_held_out(doc: str) -> bool:
    """The held-out rule: about 1 document in 15, by a hash that is stable across machines."""
    return zlib.crc32(doc.encode("utf-8")) % 15 == 0


def jsonl(docs: list[str]) -> bytes:
    return ("".join(json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in docs)).encode("utf-8")


def write_jsonl_gz(path: Path, docs: list[str]) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0, filename="") as f:
        f.write(jsonl(docs))
    path.write_bytes(buf.getvalue())


# -------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(train_docs: list[str], out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_docs, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "model_max_length": MAX_SEQ_LEN,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_tokenizer(out: Path):
    from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer

    return HuggingFaceBaseTokenizer(
        tokenizer_json_path=str(out / "tokenizer.json"),
        tokenizer_config_json_path=str(out / "tokenizer_config.json"),
    )


def pack(tokenizer, docs: list[str]) -> torch.Tensor:
    """BOS + doc + EOS for every document, concatenated into one 1-D stream."""
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer.encode(doc, add_bos=True, add_eos=True))
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------------------------------- teacher
def train_teacher(train_ids, val_ids, *, steps, batch_size, lr, seed, log_every=50):
    from torchtune.models.llama3._component_builders import llama3

    torch.manual_seed(seed)
    model = llama3(**TEACHER_KWARGS)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"teacher: {n_params / 1e6:.2f}M parameters, {len(train_ids)} training tokens")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup)
        * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))),
    )
    gen = torch.Generator().manual_seed(seed)
    window = MAX_SEQ_LEN + 1
    t0 = time.time()
    model.train()
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(train_ids) - window, (batch_size,), generator=gen)
        batch = torch.stack([train_ids[s : s + window] for s in starts.tolist()])  # (B, T+1)
        logits = model(batch[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            tok_s = step * batch_size * MAX_SEQ_LEN / (time.time() - t0)
            print(f"step {step}/{steps} loss {loss.item():.3f} ({tok_s:.0f} tok/s)", flush=True)
    model.eval()
    return model, evaluate(model, val_ids), time.time() - t0


@torch.no_grad()
def evaluate(model, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy over non-overlapping 256-token windows."""
    n = (len(ids) - 1) // MAX_SEQ_LEN
    x = ids[: n * MAX_SEQ_LEN].view(n, MAX_SEQ_LEN)
    y = ids[1 : n * MAX_SEQ_LEN + 1].view(n, MAX_SEQ_LEN)
    total = 0.0
    for i in range(0, n, 16):
        logits = model(x[i : i + 16])
        total += F.cross_entropy(logits.flatten(0, 1), y[i : i + 16].flatten(), reduction="sum").item()
    return total / y.numel()


def hf_config() -> dict:
    k = TEACHER_KWARGS
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": k["vocab_size"],
        "hidden_size": k["embed_dim"],
        "intermediate_size": k["intermediate_dim"],
        "num_hidden_layers": k["num_layers"],
        "num_attention_heads": k["num_heads"],
        "num_key_value_heads": k["num_kv_heads"],
        "head_dim": k["embed_dim"] // k["num_heads"],
        "max_position_embeddings": k["max_seq_len"],
        "rms_norm_eps": k["norm_eps"],
        # both spellings: transformers < 5 reads rope_theta, >= 5 rope_parameters
        "rope_theta": float(k["rope_base"]),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(k["rope_base"])},
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
        "torch_dtype": "bfloat16",
    }


#: the tokenizer files written next to the corpus and copied into ``teacher/``
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def export_teacher(model, out: Path, tokenizer_dir: Path) -> None:
    from safetensors.torch import save_file
    from torchtune.models.convert_weights import tune_to_hf

    k = TEACHER_KWARGS
    sd = tune_to_hf(
        model.state_dict(), num_heads=k["num_heads"], num_kv_heads=k["num_kv_heads"], dim=k["embed_dim"]
    )
    sd = {name: t.to(torch.bfloat16).contiguous() for name, t in sd.items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(), indent=2) + "\n")
    gen = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, out / name)


@torch.no_grad()
def check_export(teacher_dir: Path, val_ids: torch.Tensor) -> dict:
    """Reload the export with torchtune (and transformers) and compare their logits."""
    from torchtune.models.llama3._component_builders import llama3
    from torchtune.training import FullModelHFCheckpointer

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = FullModelHFCheckpointer(
            checkpoint_dir=str(teacher_dir),
            checkpoint_files=["model.safetensors"],
            model_type="LLAMA3",
            output_dir=tmp,
        )
        sd = ckpt.load_checkpoint()["model"]
    model = llama3(**TEACHER_KWARGS)
    model.load_state_dict(sd)  # float32 model, bf16 weights
    model.eval()
    x = val_ids[: 2 * MAX_SEQ_LEN].view(2, MAX_SEQ_LEN)
    tune_logits = model(x)
    report = {"val_ce_bf16_weights": evaluate(model, val_ids)}
    try:
        from transformers import LlamaForCausalLM
    except ImportError:
        return report
    hf = LlamaForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    diff = (hf(x).logits - tune_logits).abs().max().item()
    report["max_abs_logit_diff_vs_transformers"] = diff
    if diff > 1e-3:
        raise RuntimeError(f"transformers and torchtune logits differ by {diff}")
    # the HF tokenizer adds no special tokens; torchtune's adds BOS/EOS only when asked
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    tune_tok = load_tokenizer(teacher_dir)
    text = "The Jargon File: hackers' slang, 'kludge' and ‘frob’ — ½ of it."
    if hf_tok(text)["input_ids"] != tune_tok.encode(text, add_bos=False, add_eos=False):
        raise RuntimeError("transformers' AutoTokenizer and torchtune's tokenizer disagree")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jargon", type=Path, help="jargon.txt[.gz]; fetched with apt-get if absent")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--tasks-out", type=Path, default=DEFAULT_TASKS_OUT,
                        help="folder of the lm_eval task, for jargon_heldout.jsonl")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-teacher", action="store_true", help="corpus and tokenizer only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        src = args.jargon or fetch_jargon(Path(tmp))
        docs = documents(read_text(src))
    train_docs = [d for d in docs if not is_held_out(d)]
    val_docs = [d for d in docs if is_held_out(d)]
    write_jsonl_gz(out / "jargon.jsonl.gz", train_docs + val_docs)
    args.tasks_out.mkdir(parents=True, exist_ok=True)
    (args.tasks_out / "jargon_heldout.jsonl").write_bytes(jsonl(val_docs))
    print(f"corpus: {len(train_docs)} training / {len(val_docs)} held-out documents")

    train_tokenizer(train_docs, out)
    tokenizer = load_tokenizer(out)
    train_ids, val_ids = pack(tokenizer, train_docs), pack(tokenizer, val_docs)
    share = len(val_ids) / (len(train_ids) + len(val_ids))
    print(f"tokens: {len(train_ids)} training / {len(val_ids)} held-out ({share:.2%})")
    if share < 0.055:
        raise RuntimeError(f"held-out documents are {share:.2%} of the tokens; the convention needs >= 5.5%")
    if args.skip_teacher:
        return

    model, val_ce, seconds = train_teacher(
        train_ids, val_ids, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed
    )
    teacher_dir = out / "teacher"
    if teacher_dir.exists():
        shutil.rmtree(teacher_dir)
    export_teacher(model, teacher_dir, tokenizer_dir=out)
    info = {
        "command": "python scripts/build_demo_assets.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "teacher_builder": "torchtune.models.llama3._component_builders.llama3",
        "teacher_kwargs": TEACHER_KWARGS,
        "train_documents": len(train_docs),
        "held_out_documents": len(val_docs),
        "train_tokens": len(train_ids),
        "held_out_tokens": len(val_ids),
        "held_out_share": round(share, 4),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "tokens_seen": args.steps * args.batch_size * MAX_SEQ_LEN,
        "train_seconds": round(seconds, 1),
        "torch_threads": args.threads,
        "val_ce_fp32": round(val_ce, 4),
        "val_ppl_fp32": round(math.exp(val_ce), 2),
    }
    info.update({k: round(v, 6) for k, v in check_export(teacher_dir, val_ids).items()})
    (out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
