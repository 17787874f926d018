"""tad_torchtune: tail-aware knowledge distillation (TAD) and other divergences for torchtune."""

__version__ = "0.1.0"
