"""Datasets and batches for both stages: LLaVA samples -> token ids, labels and image features.

Batches are planned, not drawn: :func:`plan_batches` fixes every epoch's batches from the seed,
so a resumed run continues with exactly the batch it would have seen, and each process of a
multi-process run takes its own slice of every global batch.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .conversation import IGNORE, Encoded, Template, TemplateError, expand_image, fit

log = logging.getLogger(__name__)


@dataclass
class Example:
    enc: Encoded
    image: str | None  # the sample's image file name (None: text-only)


def encode_samples(
    samples: Sequence[dict], template: Template, num_image_tokens: int, max_len: int, drop_overlong: bool = True
) -> tuple[list[Example], Counter]:
    """Tokenise every sample (labels per turn), expand its image and fit it to ``max_len``.

    Returns the examples and counts: ``kept``, ``cut at a turn boundary``, ``dropped: too long``.
    A sample that cannot be tokenised raises, naming its id.
    """
    out, stats = [], Counter()
    for s in samples:
        sid = str(s.get("id", "?"))
        try:
            enc = template.encode(s["conversations"], sid)
        except (TemplateError, KeyError, TypeError) as e:
            raise TemplateError(f"sample {sid}: {e}") from None
        if s.get("image") and len(enc.image_positions) != 1:
            raise TemplateError(
                f"sample {sid}: has an image but {len(enc.image_positions)} <image> tokens (expected 1)"
            )
        if not s.get("image") and enc.image_positions:
            raise TemplateError(f"sample {sid}: has <image> in its text but no image")
        fitted = fit(enc, max_len, num_image_tokens, template)
        if fitted is None:
            stats["dropped: too long"] += 1
            if not drop_overlong:
                raise TemplateError(f"sample {sid}: its first reply does not fit in {max_len} tokens")
            continue
        if len(fitted) < len(enc):
            stats["cut at a turn boundary"] += 1
        if not any(label != IGNORE for label in fitted.labels):
            stats["dropped: nothing to learn"] += 1
            continue
        stats["kept"] += 1
        out.append(Example(expand_image(fitted, num_image_tokens), s.get("image")))
    if stats["dropped: too long"]:
        log.warning("%d sample(s) longer than %d tokens were dropped", stats["dropped: too long"], max_len)
    return out, stats


def plan_batches(
    lengths: Sequence[int],
    batch_size: int,
    epoch: int,
    seed: int,
    group_by_length: bool = False,
    mega_batches: int = 32,
    drop_last: bool = True,
) -> list[list[int]]:
    """The batches of one epoch, as index lists, fixed by ``seed`` and ``epoch``.

    ``group_by_length`` sorts each run of ``mega_batches`` batches by length before cutting it,
    so a batch holds samples of similar length and little compute goes to padding.
    """
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        span = batch_size * mega_batches
        order = [i for k in range(0, len(order), span) for i in sorted(order[k : k + span], key=lambda i: -lengths[i])]
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if group_by_length:
        rng.shuffle(batches)
    return batches


def padding_share(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of token slots that are padding when each batch pads to its longest sample."""
    total = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    real = sum(lengths[i] for b in batches for i in b)
    return 1 - real / total if total else 0.0


class Collator:
    """Right-padded ``[B, T]`` ids, labels (-100 on padding), attention mask, and the images'
    features ``[N, P, D]`` (or pixels) for the samples that have one, in batch order."""

    def __init__(
        self,
        pad_id: int,
        features: Callable[[str], torch.Tensor] | None = None,
        pixels: Callable[[list[str]], torch.Tensor] | None = None,
        padding_side: str = "right",
    ):
        self.pad_id, self.features, self.pixels, self.side = pad_id, features, pixels, padding_side

    def check_vision_key(self, vision_key: str) -> None:
        """Refuse a feature cache made by another vision tower than the model's (a reader that
        says which tower made it, :class:`llava_lite.features.FeatureReader`, is checked)."""
        made_by = getattr(self.features, "cache_key", None)
        if made_by is not None and made_by != vision_key:
            where = getattr(self.features, "folder", "the feature cache")
            raise ValueError(
                f"{where}: features of vision tower {made_by!r}, but the model was built for {vision_key!r}; "
                "extract this split's features with the model's tower"
            )

    def __call__(self, examples: Sequence[Example]) -> dict:
        T = max(len(e.enc) for e in examples)
        B = len(examples)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for b, e in enumerate(examples):
            n = len(e.enc)
            sl = slice(0, n) if self.side == "right" else slice(T - n, T)
            ids[b, sl] = torch.tensor(e.enc.input_ids)
            labels[b, sl] = torch.tensor(e.enc.labels)
            mask[b, sl] = 1
        batch = {
            "input_ids": ids,
            "labels": labels,
            "attention_mask": mask,
            "sample_ids": [e.enc.sample_id for e in examples],
        }
        images = [e.image for e in examples if e.image]
        if images:
            if self.features is not None:
                batch["image_features"] = torch.stack([self.features(name) for name in images])  # [N, P, D]
            elif self.pixels is not None:
                batch["pixel_values"] = self.pixels(images)  # [N, 3, H, W]
            else:
                raise ValueError(
                    "the batch has images but the collator has neither a feature cache nor an image loader"
                )
        return batch
