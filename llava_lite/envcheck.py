"""What this machine has, and which preset suits it (notebook 00's first cell)."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform

import torch

PACKAGES = (
    "torch",
    "torchvision",
    "transformers",
    "open_clip_torch",
    "peft",
    "accelerate",
    "tokenizers",
    "safetensors",
    "papermill",
    "nbval",
    "ipywidgets",
    "jupyterlab",
)


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def device_report() -> dict[str, object]:
    rep: dict[str, object] = {
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rep |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpus": torch.cuda.device_count(),
            "bf16": torch.cuda.is_bf16_supported(),
        }
    elif torch.backends.mps.is_available():
        rep["mps"] = True
    return rep


def training_device(name: str):
    """``torch.device(name)`` for a training job, or a clear error when that device is not here
    (``cuda`` on a machine without a CUDA GPU, an unknown name)."""
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r}: not a device name torch knows (expected cpu, cuda or cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA GPU that torch can use; train with --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def suggested_preset(rep: dict[str, object] | None = None) -> str:
    """``full`` on a GPU with 40 GB or more, ``colab`` on a smaller GPU, ``tiny`` on a CPU."""
    rep = rep or device_report()
    if not rep.get("cuda"):
        return "tiny"
    return "full" if float(rep.get("gpu_memory_gib", 0)) >= 40 else "colab"
