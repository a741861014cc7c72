"""Small dataclasses, one per concern, and the presets that fill them by name.

A preset only changes names and sizes: every stage runs the same functions in every preset.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class WorldConfig:
    """The procedural shapes world (or, for the real presets, where COCO lives)."""

    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 6
    seed: int = 0
    # scenes per split; the splits are disjoint (no scene appears in two of them)
    splits: dict[str, int] = field(
        default_factory=lambda: {"pretrain": 20000, "train": 8000, "val": 500, "test": 500}
    )


@dataclass
class TeacherConfig:
    """Who writes the instruction data: the offline symbolic teacher or a chat endpoint."""

    kind: str = "symbolic"  # "symbolic" | "chat"
    seed: int = 0
    model: str = ""  # chat model name for kind="chat"
    base_url: str = ""  # OpenAI-compatible endpoint for kind="chat"
    api_key_env: str = "OPENAI_API_KEY"  # name of the environment variable, never the key
    # chat teacher: request shape, concurrency and how hard to retry
    chat_temperature: float | None = 0.2  # None: leave it out of the request (some models refuse it)
    chat_max_tokens: int = 1024  # 0: leave it out of the request
    chat_concurrency: int = 4  # requests in flight at once
    chat_timeout_s: float = 120.0  # per request
    chat_max_retries: int = 6  # per request, on 429, 5xx, timeouts and dropped connections
    chat_backoff_s: float = 1.0  # first back-off; doubles each retry (with jitter)
    chat_max_backoff_s: float = 60.0
    chat_format_retries: int = 2  # extra requests for a context whose reply is malformed


@dataclass
class VisionConfig:
    """The frozen vision tower: an open_clip model (name + pretrained tag, or a folder) and its layer."""

    encoder: str = "tiny-clip"  # open_clip name (ViT-L-14), a folder, or a short name of data/pretrained/
    pretrained: str | None = None  # open_clip pretrained tag for a named model (e.g. "openai")
    layer: int = -2  # transformer block whose output is used: -2 penultimate (LLaVA), -1 last
    keep_cls: bool = False


@dataclass
class Preset:
    name: str
    world: WorldConfig = field(default_factory=WorldConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)

    def replace(self, **changes) -> "Preset":
        return dataclasses.replace(self, **changes)


def _tiny() -> Preset:
    return Preset(name="tiny")


def _colab() -> Preset:
    return Preset(
        name="colab",
        world=WorldConfig(image_size=224, splits={"train": 5000, "val": 200, "test": 200}),
        vision=VisionConfig(encoder="ViT-B-16", pretrained="openai"),
    )


def _full() -> Preset:
    return Preset(
        name="full",
        world=WorldConfig(image_size=336, splits={"train": 100000, "val": 1000, "test": 1000}),
        vision=VisionConfig(encoder="ViT-L-14-336", pretrained="openai"),
    )


PRESETS = {"tiny": _tiny, "colab": _colab, "full": _full}


def get_preset(name: str) -> Preset:
    """A fresh copy of the named preset (changing it never changes the defaults)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}") from None
