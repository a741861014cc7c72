"""Where files live: the outputs folder's precedence, and an installed wheel that runs a lesson from
any folder with its shipped data and writes nothing beside itself."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from llava_lite import paths

REPO = Path(__file__).resolve().parents[1]


def test_outputs_folder_is_the_explicit_one_then_home_then_the_checkout(monkeypatch, tmp_path):
    monkeypatch.delenv("LLAVA_LITE_OUTPUTS", raising=False)
    monkeypatch.delenv("LLAVA_LITE_HOME", raising=False)
    assert paths.IN_CHECKOUT and paths.outputs_root() == REPO / "outputs"
    monkeypatch.setenv("LLAVA_LITE_HOME", str(tmp_path / "drive"))
    assert paths.outputs_root() == tmp_path / "drive" / "outputs"
    assert paths.Layout.for_preset("colab").checkpoints == tmp_path / "drive" / "outputs" / "colab" / "checkpoints"
    monkeypatch.setenv("LLAVA_LITE_OUTPUTS", str(tmp_path / "explicit"))
    assert paths.outputs_root() == tmp_path / "explicit"


def test_a_checkout_reads_its_shipped_files_from_data():
    assert paths.DATA_DIR == REPO / "data"
    assert (paths.PRETRAINED_DIR / "tiny-lm" / "model.safetensors").is_file()
    assert (paths.PROMPTS_DIR / "detail" / "instructions.txt").is_file()


def test_the_shipped_backbones_stay_within_the_25_mb_budget():
    files = [p for p in paths.PRETRAINED_DIR.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    assert total <= 25 * 10**6, f"data/pretrained holds {total / 1e6:.1f} MB in {len(files)} files (budget 25 MB)"


def _build_wheel(dest: Path) -> Path:
    """Build from a copy of the sources, so the build leaves nothing in the checkout."""
    src = dest / "src"
    for name in ("llava_lite", "data"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dest), str(src)]
    subprocess.run(pip, check=True, capture_output=True)
    return next(dest.glob("llava_lite-*.whl"))


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_the_wheel_installs_into_a_fresh_environment_and_runs_notebook_00_from_any_folder(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    modules = {str(p.relative_to(REPO)) for p in (REPO / "llava_lite").rglob("*.py")}
    assert modules <= set(names), f"modules missing from the wheel: {sorted(modules - set(names))}"
    shipped = {f"llava_lite/shipped/{p.relative_to(REPO / 'data')}" for p in (REPO / "data").rglob("*") if p.is_file()}
    assert shipped <= set(names), f"shipped files missing from the wheel: {sorted(shipped - set(names))}"
    assert wheel.stat().st_size < 25 * 2**20

    # a fresh environment: this wheel, and only the dependencies taken from the project's environment
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(
        subprocess.check_output([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).decode().strip()
    )
    # a plain path line: the project's own .pth files (its editable finder among them) are not run
    (site / "project_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    install = [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run(install + [str(wheel)], check=True, capture_output=True)
    kernel = [py, "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"]
    subprocess.run(kernel, check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAVA_LITE_", "PYTHON", "JUPYTER"))}
    env |= {"JUPYTER_PATH": str(venv / "share" / "jupyter"), "HF_HUB_OFFLINE": "1", "MPLBACKEND": "agg"}
    where = subprocess.check_output(
        [py, "-c", "import llava_lite, sys; print(llava_lite.__file__)"], env=env, cwd=tmp_path
    )
    assert Path(where.decode().strip()).is_relative_to(site), where
    assert not any(
        "__editable__" in m
        for m in subprocess.check_output([py, "-c", "import sys; print(sys.meta_path)"], env=env).decode().split(",")
    )

    before = _files(site)
    work = tmp_path / "lesson"
    work.mkdir()
    nb = REPO / "notebooks" / "00_setup.ipynb"
    shutil.copy(nb, work / nb.name)
    smoke = json.loads(nb.read_text())["metadata"]["llava_lite"]["smoke_parameters"]
    run = (
        "import json, sys; from pathlib import Path; from llava_lite import tutorial; "
        "tutorial.run_notebook(Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]))"
    )
    proc = subprocess.run(
        [py, "-c", run, str(work / nb.name), str(work / "executed"), json.dumps(smoke)],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    executed = json.loads((work / "executed" / nb.name).read_text())
    errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert (work / "outputs" / "tiny" / "world" / "annotations" / "instances_train.json").is_file()
    assert len(list((work / "outputs" / "tiny" / "world" / "train").glob("*.png"))) == smoke["splits"]["train"]
    assert _files(site) == before, sorted(_files(site) ^ before)[:10]
