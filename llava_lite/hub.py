"""Where a real backbone comes from: the Hugging Face cache, else the hub, else a clear error.

The ``colab`` and ``full`` presets name hub models (an instruct LLM, an open_clip tower with
OpenAI weights). Both loaders come through here, so ``HF_HUB_CACHE`` / ``HF_HOME`` and
``HF_HUB_OFFLINE=1`` are read when a model is loaded (not when a library was imported), and a
model that is neither cached nor reachable stops with one message that says what to do.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import constants, snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

# the files a language model loads from (never ONNX exports, original checkpoints or .bin twins)
LM_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
OPEN_CLIP_FILES = ["open_clip_config.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin"]


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Loads without transformers' per-file "Loading weights" progress bars (noise in a lesson's
    output, where a load takes a fraction of a second); the setting is put back afterwards."""
    from transformers.utils import logging as hf_logging  # transformers takes seconds to import; hub reads need none

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


class ModelUnavailable(RuntimeError):
    """A hub model that is neither in the local cache nor reachable."""


def offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return value in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


def unavailable(what: str, repo_id: str, cause: Exception) -> ModelUnavailable:
    mode = "HF_HUB_OFFLINE=1 is set" if offline() else "the hub could not be reached"
    return ModelUnavailable(
        f"{what} {repo_id!r} is not in the Hugging Face cache ({cache_dir()}) and {mode} "
        f"({type(cause).__name__}: {str(cause)[:200]}). Run once with a network (on Colab: the first run "
        f"downloads it), set HF_HOME to a cache that holds it, or point the preset at a local folder."
    )


def snapshot(repo_id: str, files: list[str], what: str = "model") -> Path:
    """The local folder of a hub model's ``files`` (patterns): the cached snapshot, downloaded first
    when missing and the hub is reachable."""
    try:
        folder = snapshot_download(repo_id, allow_patterns=files, cache_dir=cache_dir(), local_files_only=offline())
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError) as e:
        raise unavailable(what, repo_id, e) from e
    return Path(folder)


def cached_file(repo_id: str, names: list[str]) -> Path | None:
    """The first of ``names`` that the cache holds for ``repo_id``, or ``None``."""
    for name in names:
        found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir())
        if isinstance(found, str):
            return Path(found)
    return None
