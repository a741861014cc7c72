"""What a lesson needs, prepared by one call: ``lesson = setup(preset, splits, ...)``.

Every notebook from 01 on starts from the same parts: the preset (with the split sizes the tests
pass), the shapes world on disk, the instruction data of some splits, the frozen vision tower and
the feature cache of some splits, and a fresh LLaVA over the pretrained language model. Each part
is built only when it is missing (the world, the data and the features are kept on disk between
lessons), so running a notebook after the one before it costs little.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from . import coco, stages, world
from .coco import SymbolicContext
from .config import Preset, get_preset
from .features import FeatureReader
from .model import LlavaLite
from .paths import Layout
from .teachers import instruct
from .vision import VisionTower


@dataclass
class Lesson:
    """The parts of one lesson; ``features[split]`` reads the cached patch tokens of a split."""

    cfg: Preset
    layout: Layout
    tower: VisionTower | None = None
    features: dict[str, FeatureReader] = field(default_factory=dict)
    model: LlavaLite | None = None
    tokenizer: object = None

    def contexts(self, split: str) -> list[SymbolicContext]:
        """The symbolic contexts (captions and boxes) of a split's scenes."""
        return coco.load_contexts(self.layout.instances(split), self.layout.captions(split))

    def fresh_model(self, seed: int | None = None) -> tuple[LlavaLite, object]:
        """A new LLaVA over a freshly loaded language model (its own tokenizer), projector untrained."""
        lm, tokenizer = stages.load_language(self.cfg.language)
        return stages.build_llava(self.cfg, lm, tokenizer, self.tower, seed=seed), tokenizer


def setup(
    preset: str = "tiny",
    splits: dict[str, int] | None = None,
    instruct_splits: Sequence[str] = (),
    feature_splits: Sequence[str] = (),
    tower: bool = False,
    model: bool = False,
) -> Lesson:
    """Prepare a lesson: the preset (``splits`` overrides its scenes per split), the world on disk,
    the instruction data of ``instruct_splits``, the vision tower (when ``tower``, ``model`` or
    ``feature_splits`` ask for it), the feature cache of ``feature_splits`` and, with ``model``,
    a fresh LLaVA and its tokenizer. CPU training runs with denormals flushed (they stall steps)."""
    torch.set_flush_denormal(True)
    cfg = get_preset(preset)
    if splits:
        cfg.world.splits = dict(splits)
    lesson = Lesson(cfg, Layout.for_preset(preset))
    world.generate(cfg.world, lesson.layout.world, progress=False)  # kept as it is when already on disk
    for split in instruct_splits:
        instruct.build_split(lesson.layout, split)
    if tower or model or feature_splits:
        lesson.tower = stages.load_vision(cfg.vision)
    for split in feature_splits:
        lesson.features[split] = stages.split_features(lesson.layout, split, lesson.tower, progress=False)
    if model:
        lesson.model, lesson.tokenizer = lesson.fresh_model()
    return lesson
