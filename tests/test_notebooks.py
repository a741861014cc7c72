"""Every notebook under notebooks/ runs headless at smoke size, and nbval re-checks the executed copy.

A notebook keeps its smoke sizes in its own metadata (``metadata.llava_lite.smoke_parameters``),
so a new lesson is picked up here with no change to this file.
"""

import ast
import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llava_lite import tutorial

NOTEBOOKS = tutorial.notebooks() + tutorial.appendices()  # every check holds for the optional notebooks too


def _parameters_cell(nb: dict) -> str:
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "a lesson has exactly one cell tagged 'parameters'"
    return "".join(cells[0]["source"])


def test_there_are_lessons_to_run():
    assert NOTEBOOKS and NOTEBOOKS[0].name == "00_setup.ipynb"
    assert all(p.name.startswith("appendix_") for p in tutorial.appendices())
    assert not set(tutorial.appendices()) & set(tutorial.notebooks()), "an appendix is not one of the lessons"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_clean_and_declares_its_smoke_parameters(path: Path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    dirty = [
        i
        for i, c in enumerate(nb["cells"])
        if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))
    ]
    assert not dirty, f"{path.name}: cells {dirty} were committed with outputs"
    params = _parameters_cell(nb)
    smoke = tutorial.smoke_parameters(path)
    assert smoke, f"{path.name}: metadata.llava_lite.smoke_parameters is missing"
    unknown = [k for k in smoke if f"\n{k} =" not in "\n" + params]
    assert not unknown, f"{path.name}: smoke parameters {unknown} are not defined in its parameters cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_lesson_cells_are_short_define_nothing_and_leave_the_work_to_the_package(path: Path):
    """A notebook explains and calls; a function, a class or a long cell belongs in llava_lite/, and
    every lesson after 00 (which shows the preset, the layout and the world step by step) prepares
    its parts with one lesson.setup call."""
    cells = ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    long = [i for i, src in enumerate(cells) if len(src.splitlines()) > 15]
    assert not long, f"{path.name}: code cells {long} have more than 15 lines"
    defined = [(i, type(node).__name__) for i, src in enumerate(cells) for node in ast.walk(ast.parse(src))
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))]  # fmt: skip
    assert not defined, f"{path.name}: cells define {defined}"
    if not path.name.startswith("00"):
        assert sum(src.count("lesson.setup(") for src in cells) == 1, f"{path.name}: expected one lesson.setup call"


NOISE = re.compile(r"\w*Warning\b|Loading weights|Loading checkpoint shards")  # third-party notes, not the lesson's


def _output_lines(nb: dict) -> list[tuple[int, str]]:
    """``(cell index, line)`` of every text a cell showed: streams, displays and their plain-text form."""
    lines = []
    for i, c in enumerate(nb["cells"]):
        for o in c.get("outputs", []):
            texts = [o.get("text", "")] + [o.get("data", {}).get("text/plain", "")]
            lines += [(i, line) for t in texts for line in ("".join(t) if isinstance(t, list) else t).splitlines()]
    return lines


def _twice(executed: Path) -> Path:
    """The executed notebook with all its cells a second time after the last: nbval then runs the
    lesson top to bottom twice in one kernel (a cell that breaks on a re-run fails there), and checks
    the marked cells of both passes against the first run's outputs."""
    nb = json.loads(executed.read_text())
    again = copy.deepcopy(nb["cells"])
    for c in again:
        c["id"] = f"{c.get('id', 'cell')}-again"
    nb["cells"] += again
    twice = executed.with_name(executed.stem + ".twice.ipynb")
    twice.write_text(json.dumps(nb))
    return twice


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_at_smoke_size_twice_in_one_kernel_quietly_and_passes_nbval(path: Path, outputs_dir: Path):
    executed = tutorial.run_notebook(path, outputs_dir / "notebooks", tutorial.smoke_parameters(path))
    nb = json.loads(executed.read_text())
    errors = [
        o
        for c in nb["cells"]
        if c["cell_type"] == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
    solutions = [c for c in nb["cells"] if "solution" in c.get("metadata", {}).get("tags", [])]
    assert solutions, f"{path.name}: no exercise solution runs (code cells tagged 'solution')"
    assert all(c["execution_count"] for c in solutions), f"{path.name}: a solution cell did not run"
    noise = [(i, line[:160]) for i, line in _output_lines(nb) if NOISE.search(line)]
    assert not noise, f"{path.name}: third-party warnings or progress bars in the outputs: {noise}"
    ini = outputs_dir / "nbval.ini"
    ini.write_text("[pytest]\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-c",
            str(ini),
            "-p",
            "no:cacheprovider",
            "--nbval-lax",
            "--nbval-current-env",
            str(_twice(executed)),
        ],
        capture_output=True,
        text=True,
        cwd=outputs_dir,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
