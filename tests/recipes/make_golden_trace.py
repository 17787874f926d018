"""Regenerate tests/assets/golden_loss_trace.json: the 10-step fp32 baseline run of the recipe
tests (same assets, same config). Run only when a change to the math is intended:

    python tests/recipes/make_golden_trace.py
"""

import json
import tempfile
from pathlib import Path

import torch

from tests.helpers import tune

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        assets = tune.make_assets(root / "assets")
        out = root / "out"
        cfg = tune.base_config(assets, out, save_every_n_steps=2, eval_every_n_steps=5)
        tune.run_tune(["tad_distill", "--config", str(tune.write_config(cfg, root / "c.yaml"))],
                      cwd=root)
        losses = tune.train_losses(out)
    target = Path(__file__).parents[1] / "assets" / "golden_loss_trace.json"
    target.write_text(json.dumps({"torch": torch.__version__, "loss": losses}, indent=1) + "\n")
    print(f"wrote {target}")
