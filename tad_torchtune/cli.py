"""The recipes and configs this package ships, listed and copied as ``tune ls`` and ``tune cp`` do
for torchtune's own.

    python -m tad_torchtune ls                         # one line per recipe and per config
    python -m tad_torchtune cp demo my_demo.yaml       # a config (NAME or NAME.yaml) to a file
    python -m tad_torchtune cp tad_distill mine/       # a recipe (NAME or NAME.py) into a folder
    python -m tad_torchtune cp demo my_demo.yaml --force

A recipe's line is the first paragraph of its module docstring, a config's the first paragraph of
its header (the comment lines before the first blank ``#`` line), joined into one line. ``cp``
refuses to overwrite an existing file without ``--force``. Errors a user can cause print one line
and exit with status 1.
"""

from __future__ import annotations

import argparse
import ast
import importlib.resources
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from tad_torchtune import RECIPES


class CLIError(Exception):
    """An error the user caused: printed as one line, exit status 1."""


def shipped_configs() -> dict[str, Path]:
    """Config name -> path of every YAML file of ``tad_torchtune.configs``, sorted by name."""
    root = importlib.resources.files("tad_torchtune.configs")
    files = sorted(p.name for p in root.iterdir() if p.name.endswith(".yaml"))
    return {name[: -len(".yaml")]: Path(str(root / name)) for name in files}


def recipe_path(name: str) -> Path:
    """The source file of the recipe module ``name`` (installed as a top-level module)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise CLIError(f"recipe {name!r} is listed in tad_torchtune.RECIPES but not installed")
    return Path(spec.origin)


def _first_paragraph(lines: list[str]) -> str:
    words: list[str] = []
    for line in lines:
        if not line.strip():
            if words:
                break
            continue
        words.append(line.strip())
    return " ".join(words)


def config_summary(path: Path) -> str:
    """The first paragraph of the comment block that opens the YAML file ``path``."""
    header = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        header.append(line[1:])
    return _first_paragraph(header)


def recipe_summary(path: Path) -> str:
    """The first paragraph of the module docstring of ``path``, read without importing it."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    return _first_paragraph(doc.splitlines())


def _table(title: str, rows: dict[str, str]) -> list[str]:
    width = max(len(title), *(len(name) for name in rows)) + 2
    lines = [f"{title:<{width}}DESCRIPTION"]
    return lines + [f"{name:<{width}}{text}" for name, text in rows.items()]


def ls_lines() -> list[str]:
    """The lines ``ls`` prints: a table of the recipes, a blank line, a table of the configs."""
    recipes = {name: recipe_summary(recipe_path(name)) for name in RECIPES}
    configs = {name: config_summary(path) for name, path in shipped_configs().items()}
    return _table("RECIPE", recipes) + [""] + _table("CONFIG", configs)


def copy_shipped(name: str, dest: str | Path, *, force: bool = False) -> Path:
    """Copy the shipped config or recipe ``name`` to ``dest``; returns the file written.

    Args:
        name: a config (``demo`` or ``demo.yaml``) or a recipe (``tad_distill`` or
            ``tad_distill.py``).
        dest: the file to write, or an existing folder to copy it into under its own name
            (a string ending with ``/`` must be a folder).
        force: overwrite an existing file.

    Raises:
        CLIError: ``name`` is not shipped, ``dest`` exists (without ``force``) or its folder
            does not.
    """
    configs = shipped_configs()
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    recipe = name[: -len(".py")] if name.endswith(".py") else name
    if stem in configs and not name.endswith(".py"):
        source = configs[stem]
    elif recipe in RECIPES and not name.endswith(".yaml"):
        source = recipe_path(recipe)
    else:
        raise CLIError(
            f"cp: {name!r} is not a shipped config or recipe; configs: {', '.join(configs)}; "
            f"recipes: {', '.join(RECIPES)}"
        )
    folder_meant = str(dest).endswith(("/", os.sep))
    dest = Path(dest)
    target = dest / source.name if dest.is_dir() or folder_meant else dest
    if not target.parent.is_dir():
        raise CLIError(f"cp: destination folder {str(target.parent)!r} does not exist")
    if target.exists() and not force:
        raise CLIError(f"cp: {str(target)!r} already exists; add --force to overwrite it")
    shutil.copyfile(source, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tad_torchtune",
        description="List or copy the recipes and configs that tad_torchtune ships.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("ls", help="list the recipes and configs, one line each")
    cp = commands.add_parser("cp", help="copy a shipped config or recipe")
    cp.add_argument("name", help="config (NAME or NAME.yaml) or recipe (NAME or NAME.py)")
    cp.add_argument("dest", help="file to write, or an existing folder")
    cp.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = parser.parse_args(argv)
    try:
        if args.command == "ls":
            print("\n".join(ls_lines()))
        else:
            copied = copy_shipped(args.name, args.dest, force=args.force)
            print(f"Copied {copied}")
            if copied.suffix == ".py":  # a recipe: tune run takes its file name, from its folder
                print(f"run it with: cd {copied.resolve().parent} && tune run {copied.name} "
                      f"--config ...")
    except CLIError as err:
        print(err, file=sys.stderr)
        return 1
    return 0
