"""``transformers serve`` (transformers' own OpenAI-compatible server) for a test: started offline
on a free port of 127.0.0.1, waited for until ``/health`` answers, stopped when the block ends."""

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_executable() -> str:
    exe = Path(sys.executable).with_name("transformers")
    found = str(exe) if exe.exists() else shutil.which("transformers")
    assert found, "the `transformers` command is missing: pip install 'transformers[serving]'"
    return found


@contextmanager
def transformers_serve(model_dir: Path, log_path: Path, env: dict | None = None, timeout_s: float = 60):
    """Serve ``model_dir``; yields the base URL (``http://127.0.0.1:PORT``). The server's output
    goes to ``log_path``; its tail is in the message when it exits or does not come up."""
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **(env or {}))
    cmd = [serve_executable(), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            cmd + ["--device", "cpu", "--log-level", "info"], stdout=logf, stderr=subprocess.STDOUT, env=env
        )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert proc.poll() is None, f"transformers serve exited: {log_path.read_text()[-2000:]}"
            assert time.monotonic() < deadline, (
                f"transformers serve not up in {timeout_s} s: {log_path.read_text()[-2000:]}"
            )
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
