"""``python -m tad_torchtune ls`` and ``cp``, run as a user runs them, against the shipped files."""

import subprocess
import sys
from pathlib import Path

import pytest

from tad_torchtune import RECIPES

REPO = Path(__file__).parents[1]
CONFIGS = sorted(REPO.glob("configs/*.yaml"))


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tad_torchtune", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


def test_recipes_tuple_is_pyproject_py_modules():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert list(RECIPES) == pyproject["tool"]["setuptools"]["py-modules"]
    assert all((REPO / "recipes" / f"{name}.py").is_file() for name in RECIPES)


def test_ls_lists_every_recipe_and_config_with_its_header():
    proc = run_cli("ls")
    assert proc.returncode == 0 and proc.stderr == ""
    lines = proc.stdout.splitlines()
    blank = lines.index("")
    recipes, configs = lines[1:blank], lines[blank + 2:]
    assert lines[0].split() == ["RECIPE", "DESCRIPTION"]
    assert lines[blank + 1].split() == ["CONFIG", "DESCRIPTION"]
    assert [line.split()[0] for line in recipes] == list(RECIPES)
    assert [line.split()[0] for line in configs] == [p.stem for p in CONFIGS]
    # descriptions start in one column
    column = lines[0].index("DESCRIPTION")
    assert all(line[column - 2:column] == "  " and line[column] != " " for line in recipes)

    rows = {line.split()[0]: line[lines[blank + 1].index("DESCRIPTION"):] for line in configs}
    rows |= {line.split()[0]: line[column:] for line in recipes}
    # recorded values: the first paragraph of the header / docstring, on one line
    assert rows["tad_eval"] == "Held-out evaluation of distilled students against their teacher."
    assert rows["demo_eval"] == ("Held-out evaluation of students against the bundled demo "
                                 "teacher (tad_torchtune/assets/demo).")
    assert rows["gemma2_9b_to_third"] == (
        "TAD pretraining distillation: Gemma2-9B -> one-third-depth student, with a hidden-state "
        "cosine loss, on 2 GPUs (paper §3.2.2, Table 4).")
    for path in CONFIGS:  # every line is the opening of that file's comment header
        header = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.startswith("#"):
                break
            header.append(line.lstrip("#").strip())
        assert rows[path.stem] and " ".join(h for h in header if h).startswith(rows[path.stem])
        assert header[0] and rows[path.stem].startswith(header[0])


def test_cp_config_to_a_file_and_into_a_folder(tmp_path):
    source = REPO / "configs" / "demo_eval.yaml"
    proc = run_cli("cp", "demo_eval", str(tmp_path / "mine.yaml"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"Copied {tmp_path / 'mine.yaml'}\n"
    assert (tmp_path / "mine.yaml").read_bytes() == source.read_bytes()

    proc = run_cli("cp", "demo_eval.yaml", ".", cwd=tmp_path)  # a folder: keeps the name
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "demo_eval.yaml").read_bytes() == source.read_bytes()

    proc = run_cli("cp", "tad_eval", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "tad_eval.py").read_bytes() == (REPO / "recipes" / "tad_eval.py").read_bytes()


def test_cp_of_a_recipe_says_how_to_run_the_copy(tmp_path):
    """``tune run`` takes a recipe file by its name from the folder it is in (a path, relative
    or absolute, ends in torchtune's 'Relative module names not supported')."""
    proc = run_cli("cp", "tad_distill", "mine.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (f"Copied mine.py\nrun it with: cd {tmp_path.resolve()} && tune run "
                           f"mine.py --config ...\n")
    assert (tmp_path / "mine.py").read_bytes() == (REPO / "recipes" / "tad_distill.py").read_bytes()


def test_cp_refuses_to_overwrite_without_force(tmp_path):
    dest = tmp_path / "demo.yaml"
    dest.write_text("mine\n")
    proc = run_cli("cp", "demo", str(dest))
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"cp: '{dest}' already exists; add --force to overwrite it\n"
    assert dest.read_text() == "mine\n"
    proc = run_cli("cp", "demo", str(tmp_path), "--force")  # into the folder, same file
    assert proc.returncode == 0, proc.stderr
    assert dest.read_bytes() == (REPO / "configs" / "demo.yaml").read_bytes()


def test_cp_errors_are_one_line(tmp_path):
    names = ", ".join(p.stem for p in CONFIGS)
    proc = run_cli("cp", "demo_evil", str(tmp_path))
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == (f"cp: 'demo_evil' is not a shipped config or recipe; configs: {names}; "
                           f"recipes: {', '.join(RECIPES)}\n")
    proc = run_cli("cp", "tad_eval.yaml", str(tmp_path))  # a recipe is not a config
    assert proc.returncode == 1 and proc.stderr.startswith("cp: 'tad_eval.yaml' is not a shipped")
    proc = run_cli("cp", "demo", str(tmp_path / "no" / "such" / "x.yaml"))
    assert proc.returncode == 1
    assert proc.stderr == f"cp: destination folder '{tmp_path / 'no' / 'such'}' does not exist\n"
    proc = run_cli("cp", "demo", f"{tmp_path / 'mine'}/")  # a folder meant, not a file 'mine'
    assert proc.returncode == 1
    assert proc.stderr == f"cp: destination folder '{tmp_path / 'mine'}' does not exist\n"
    assert not list(tmp_path.iterdir())
