"""What ``teacher_id_merges`` changes in a trained student: the demo distilled from a teacher
whose stop mass lies mostly past the student's vocabulary, with the cut alone and with the merge.

    python benchmarks/stop_mass.py [--out /tmp/stop_mass] [--seeds 0 1 2] [--steps 200]
        [--json FILE]

The teacher is the demo's with two more output rows (ids 2048 and 2049, the embedding rows
too), each equal to its end-of-text row (id 1): its probability of ending a document is split
in three equal parts, two of them past the student's 2048 ids, as Phi-3's end-of-text (32000)
and <|end|> (32007) lie past Llama-2's 32000 ids beside its ``</s>`` (2). The student is the
demo's config with a fresh 2-layer model of the teacher's widths over 2048 ids (a
``pruned_student`` would copy the teacher's 2050 embedding rows), trained ``--steps`` steps of
the demo's TAD per seed, twice: ``vocab_alignment: truncate_teacher`` alone ("cut": the
teacher's two thirds of the stop mass are dropped, and its other ids renormalised) and with
``teacher_id_merges: {2048: 1, 2049: 1}`` ("merged": added to id 1 first). On the demo's
held-out blocks: each model's mean probability of the end-of-text where the label is the
end-of-text, and its forward KL from the merged teacher (the teacher's distribution over the
student's ids, the stop mass whole) over every position; the teacher's two distributions
beside. The cut teacher is exactly the demo teacher (the copies' mass renormalised away); the
merged one gives the end-of-text three times its weight. Each run folder records what it
trained (``stop_mass.json``) and is reused only for the same seed, steps and merge.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

EOS = 1  # the demo tokenizer's end-of-text
EXTRA = (2048, 2049)  # the teacher's rows past the student's vocabulary, copies of EOS's


def padded_teacher(folder: Path) -> Path:
    """The demo teacher with the ``EXTRA`` rows, as a Hugging Face folder."""
    from safetensors.torch import load_file, save_file

    from tad_torchtune.data import resolve_asset

    demo = Path(resolve_asset("pkg://demo/teacher"))
    folder.mkdir(parents=True, exist_ok=True)  # written again each time: a few MB
    weights = load_file(demo / "model.safetensors")
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[key] = torch.cat([weights[key], weights[key][EOS].repeat(len(EXTRA), 1)])
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    hf = json.loads((demo / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**hf, "vocab_size": 2048 + len(EXTRA)}))
    return folder


def train(out: Path, teacher: Path, seed: int, steps: int, merged: bool) -> Path:
    """One run of the demo's config against the padded teacher, in this process."""
    import tad_distill

    from tad_torchtune.cli import shipped_configs

    cfg = OmegaConf.load(shipped_configs()["demo"])
    node = OmegaConf.to_container(cfg.teacher_model)
    cfg.output_dir = str(out)
    cfg.seed = seed
    cfg.max_steps = steps
    cfg.teacher_model = {**node, "vocab_size": 2048 + len(EXTRA)}
    cfg.student_model = {**node, "num_layers": 2}
    cfg.teacher_checkpointer.checkpoint_dir = str(teacher)
    cfg.vocab_alignment = "truncate_teacher"
    cfg.metric_logger = {"_component_": "torchtune.training.metric_logging.DiskLogger",
                         "log_dir": str(out / "logs")}
    if merged:
        cfg.teacher_id_merges = {i: EOS for i in EXTRA}
    made = {"seed": seed, "steps": steps, "merged": merged}
    stamp = out / "stop_mass.json"  # what an earlier run in this folder trained
    if (out / "student" / "config.json").is_file() and stamp.is_file() and \
            json.loads(stamp.read_text()) == made:
        return out / "student"
    shutil.rmtree(out, ignore_errors=True)
    tad_distill.run(cfg)
    stamp.write_text(json.dumps(made))
    return out / "student"


@torch.no_grad()
def measure(models: dict[str, Path], teacher: Path) -> dict[str, dict[str, float]]:
    """Per model, on the demo's held-out blocks: ``p_eos_at_eos`` and ``kl_from_merged``."""
    from tad_torchtune.data import TextBlockDataset, collate
    from tad_torchtune.demo import demo_tokenizer
    from tad_torchtune.models import forward_hidden, project_logits
    from tad_torchtune.models.loading import load_hf_folder

    blocks = TextBlockDataset(demo_tokenizer(), source="pkg://demo/jargon.jsonl.gz",
                              max_seq_len=128, split="validation", validation_fraction=0.05)
    batches = [collate([blocks[i] for i in range(s, min(len(blocks), s + 16))])
               for s in range(0, len(blocks), 16)]
    cpu = torch.device("cpu")

    def probabilities(folder: Path) -> list[torch.Tensor]:
        model = load_hf_folder(str(folder), where=str(folder), device=cpu, dtype=torch.float32)
        return [project_logits(model, forward_hidden(model, b.tokens)[0]).double().softmax(-1)
                for b in batches]

    full = probabilities(teacher)
    merged, cut = [], []
    for p in full:
        kept = p[..., :2048]
        cut.append(kept / kept.sum(-1, keepdim=True))
        m = kept.clone()
        m[..., EOS] += p[..., list(EXTRA)].sum(-1)
        merged.append(m)
    dists = {"teacher, merged": merged, "teacher, cut": cut}
    dists |= {name: probabilities(folder) for name, folder in models.items()}
    out = {}
    for name, qs in dists.items():
        at_eos = kl = 0.0
        n_eos = n = 0
        for q, m, b in zip(qs, merged, batches):
            valid, eos = b.labels != -100, b.labels == EOS
            at_eos += float(q[..., EOS][eos].sum())
            n_eos += int(eos.sum())
            kl += float((m * (m.clamp_min(1e-300).log() - q.clamp_min(1e-300).log()))
                        .sum(-1)[valid].sum())
            n += int(valid.sum())
        out[name] = {"p_eos_at_eos": at_eos / n_eos, "kl_from_merged": kl / n,
                     "eos_labels": n_eos, "positions": n}
    return out


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(prog="stop_mass.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/stop_mass"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    teacher = padded_teacher(args.out / "teacher")
    models = {f"{how} {seed}": train(args.out / f"{how}_{seed}", teacher, seed, args.steps,
                                     how == "merged")
              for seed in args.seeds for how in ("cut", "merged")}
    rows = measure(models, teacher)
    for name, r in rows.items():
        print(f"{name:16s} p(EOS | label EOS) {r['p_eos_at_eos']:.4f}  KL(merged teacher || "
              f"model) {r['kl_from_merged']:.4f}  ({r['eos_labels']} EOS labels, "
              f"{r['positions']} positions)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
