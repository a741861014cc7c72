"""A lesson run headless (papermill, as ``llava-lite tutorial`` and Colab's "run all" do), killed
mid-training like a dropped Colab session, and run again from the top: it resumes from the run
folder's last checkpoint in the configured home folder instead of starting over."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from llava_lite import io, jsonl, tutorial

NOTEBOOK = tutorial.NOTEBOOK_DIR / "03_stage1_alignment.ipynb"
SAVE_EVERY = 20  # the notebook's save_every: the first checkpoint comes early, the run goes on well after it
RUN = ["-c", "import sys; from pathlib import Path; from llava_lite import tutorial; "
       "tutorial.run_notebook(Path(sys.argv[1]), Path(sys.argv[2]), {'max_steps': int(sys.argv[3]), 'n_show': 1, "
       f"'save_every': {SAVE_EVERY}, 'splits': {{'pretrain': 24, 'test': 8, 'train': 48, 'val': 8}}}})"]  # fmt: skip


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the runner and everything under it (papermill's kernel included), as a lost session does."""
    tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


@pytest.mark.slow  # two notebook runs of a few hundred tiny steps
def test_a_notebook_killed_mid_training_and_run_again_resumes_from_its_checkpoint(tmp_path):
    home = tmp_path / "drive"  # LLAVA_LITE_HOME: a Drive folder on Colab
    env = {k: v for k, v in os.environ.items() if k != "LLAVA_LITE_OUTPUTS"}
    env.update(LLAVA_LITE_HOME=str(home), OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    steps = 10 * SAVE_EVERY  # long enough after the first checkpoint to be killed before the end
    run_dir = home / "outputs" / "tiny" / "checkpoints" / "stage1"
    cmd = [sys.executable, *RUN, str(NOTEBOOK), str(tmp_path / "executed"), str(steps)]

    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:
        pointer = run_dir / "latest.json"
        if pointer.exists() and io.read_json(pointer).get("path") == f"checkpoint-{SAVE_EVERY}":
            break
        time.sleep(0.1)
    assert first.poll() is None, f"the first run ended before it could be killed: {first.stderr.read()[-2000:]!r}"
    _kill_tree(first)
    assert not (run_dir / "summary.json").exists()  # killed mid-training, before the end

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = io.read_json(run_dir / "summary.json")
    assert (summary["started_at"], summary["steps"]) == (SAVE_EVERY, steps)  # resumed, and as long as a whole run
    logged = [rec["step"] for _, rec in jsonl.read_jsonl(run_dir / "metrics.jsonl")]
    assert logged == sorted(set(logged)) and logged[-1] == steps and SAVE_EVERY in logged
    assert (run_dir / f"checkpoint-{steps}").is_dir()
