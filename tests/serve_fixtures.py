"""``transformers serve`` (transformers' own OpenAI-compatible server) for a test: the package's
:func:`llava_lite.export.serve`, offline on a free port of 127.0.0.1, stopped when the block ends."""

from contextlib import contextmanager
from pathlib import Path

from llava_lite.export import serve, serve_command


@contextmanager
def transformers_serve(model_dir: Path, log_path: Path, env: dict | None = None, timeout_s: float = 60):
    """Serve ``model_dir``; yields the server's root URL (``http://127.0.0.1:PORT``, no ``/v1``)."""
    assert serve_command(), "the `transformers` command is missing: pip install 'transformers[serving]'"
    with serve(model_dir, log_path=log_path, env=env, timeout_s=timeout_s) as base_url:
        yield base_url.removesuffix("/v1")
