"""tad_torchtune: tail-aware knowledge distillation (TAD) and other divergences for torchtune."""

__version__ = "0.1.0"

#: The recipes, installed as top-level modules (``py-modules`` in pyproject.toml, which must list
#: the same names) so that ``tune run NAME`` finds them; ``python -m tad_torchtune ls`` lists them.
RECIPES: tuple[str, ...] = (
    "tad_distill",
    "tad_eval",
    "tad_eleuther_eval",
    "tad_prepare",
    "tad_cache",
)
