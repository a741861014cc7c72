"""Run the notebooks headless with papermill, in order, into the ignored outputs folder.

``llava-lite tutorial`` runs every lesson with its defaults (the full ``tiny`` lesson); the test
suite calls :func:`run_notebook` on the lessons and the optional :func:`appendices`, each with its
own smoke parameters, which a notebook keeps in its metadata
(``metadata.llava_lite.smoke_parameters``), so a new notebook needs no new test.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from . import io
from .paths import REPO_DIR, notebooks_out

log = logging.getLogger(__name__)
NOTEBOOK_DIR = REPO_DIR / "notebooks"
KERNEL = "python3"


def notebooks(folder: Path = NOTEBOOK_DIR) -> list[Path]:
    """The lessons in their order (file names start with their number)."""
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def appendices(folder: Path = NOTEBOOK_DIR) -> list[Path]:
    """The optional notebooks (``appendix_*.ipynb``): the tests run them, ``llava-lite tutorial`` does not."""
    return sorted(p for p in folder.glob("appendix_*.ipynb"))


def smoke_parameters(path: Path) -> dict:
    meta = json.loads(Path(path).read_text(encoding="utf-8")).get("metadata", {})
    return dict(meta.get("llava_lite", {}).get("smoke_parameters", {}))


def run_notebook(path: Path, out_dir: Path, parameters: dict | None = None, progress: bool = False) -> Path:
    """Execute one notebook into ``out_dir`` (same file name); returns the executed copy's path."""
    import papermill as pm  # the notebook extra (pip install "llava-lite[notebook]"); Colab runs cells itself

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / Path(path).name
    pm.execute_notebook(
        str(path),
        str(out),
        parameters=parameters or {},
        kernel_name=KERNEL,
        cwd=str(Path(path).parent),
        progress_bar=progress,
        log_output=False,
    )
    return out


def run_all(preset: str = "tiny", out_dir: Path | None = None, only: list[str] | None = None) -> dict[str, float]:
    """Run every lesson with its defaults; writes ``timings.json`` beside the executed copies."""
    out_dir = Path(out_dir or notebooks_out())
    timings: dict[str, float] = {}
    for nb in notebooks():
        if only and not any(nb.name.startswith(o) for o in only):
            continue
        log.info("running %s (preset %s)", nb.name, preset)
        t0 = time.perf_counter()
        run_notebook(nb, out_dir, {"preset": preset}, progress=True)
        timings[nb.name] = round(time.perf_counter() - t0, 1)
        log.info("%s done in %.0f s -> %s", nb.name, timings[nb.name], out_dir / nb.name)
        io.write_json(out_dir / "timings.json", {"preset": preset, "seconds": timings}, indent=2)
    return timings
