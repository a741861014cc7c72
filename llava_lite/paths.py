"""The one place that knows where files live.

Inputs that ship with the project sit under ``data/`` (pretrained tiny backbones, prompt files);
an installed package (a wheel, a git URL) carries the same files as ``llava_lite/shipped/``.
Everything the tutorial generates goes under one outputs folder, one sub-folder per preset:

    outputs/<preset>/world/{annotations,<split>}/   COCO-format scenes
    outputs/<preset>/instruct/                      LLaVA-format JSON
    outputs/<preset>/scienceqa/                     the world's multiple-choice set (ScienceQA's format)
    outputs/<preset>/features/                      feature cache shards
    outputs/<preset>/checkpoints/                   training runs
    outputs/notebooks/                              executed notebooks

The outputs folder is, the first that applies: ``$LLAVA_LITE_OUTPUTS`` (the tests point it at a
temporary directory); ``$LLAVA_LITE_HOME/outputs`` (one folder of your choice, a Google Drive
folder on Colab, so a disconnect loses nothing); ``outputs/`` of the checkout the package runs
from; ``outputs/`` under the working directory (an installed package never writes beside itself).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
# a checkout has pyproject.toml beside the package; an installed package sits in site-packages
IN_CHECKOUT = (REPO_DIR / "pyproject.toml").is_file() and (REPO_DIR / "data" / "prompts").is_dir()
DATA_DIR = REPO_DIR / "data" if IN_CHECKOUT else PACKAGE_DIR / "shipped"
# the shipped tiny backbones; LLAVA_LITE_PRETRAINED points at a folder of your own retrained ones
PRETRAINED_DIR = Path(os.environ.get("LLAVA_LITE_PRETRAINED", DATA_DIR / "pretrained"))
PROMPTS_DIR = DATA_DIR / "prompts"


def outputs_root() -> Path:
    """Where everything generated goes (read at each call, so a notebook may set the variables first)."""
    if os.environ.get("LLAVA_LITE_OUTPUTS"):
        return Path(os.environ["LLAVA_LITE_OUTPUTS"])
    if os.environ.get("LLAVA_LITE_HOME"):
        return Path(os.environ["LLAVA_LITE_HOME"]).expanduser() / "outputs"
    return REPO_DIR / "outputs" if IN_CHECKOUT else Path.cwd() / "outputs"


@dataclass(frozen=True)
class Layout:
    """Where one preset's generated files live."""

    root: Path

    @classmethod
    def for_preset(cls, preset: str) -> Layout:
        return cls(outputs_root() / preset)

    @property
    def world(self) -> Path:
        return self.root / "world"

    def instances(self, split: str) -> Path:
        return self.world / "annotations" / f"instances_{split}.json"

    def captions(self, split: str) -> Path:
        return self.world / "annotations" / f"captions_{split}.json"

    def images(self, split: str) -> Path:
        return self.world / split

    @property
    def instruct(self) -> Path:
        return self.root / "instruct"

    @property
    def scienceqa(self) -> Path:
        return self.root / "scienceqa"

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"


def notebooks_out() -> Path:
    return outputs_root() / "notebooks"
