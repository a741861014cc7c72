"""Instruction data for every split: symbolic contexts in, LLaVA-format JSON out.

    outputs/<preset>/instruct/<split>.json        a JSON list of LLaVA samples (all types)
    outputs/<preset>/instruct/<split>.stats.json  samples per type, and what was left out

The ``pretrain`` split gets ``caption`` and ``exact`` samples only (the tiny language model's
reading text); the other splits get every type.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from pathlib import Path

from .. import io
from ..coco import load_contexts
from ..paths import Layout
from . import chat, symbolic

log = logging.getLogger(__name__)

PRETRAIN_KINDS = ("caption", "exact")


def kinds_for(split: str) -> tuple[str, ...]:
    return PRETRAIN_KINDS if split == "pretrain" else symbolic.TYPES


def build_split(
    layout: Layout,
    split: str,
    seed: int = 0,
    teacher: str = "symbolic",
    limit: int | None = None,
    kinds: tuple[str, ...] | None = None,
) -> Path:
    """Write ``<split>.json`` (kept as it is when it already holds this split's samples)."""
    out = layout.instruct / f"{split}.json"
    stats_path = layout.instruct / f"{split}.stats.json"
    kinds = tuple(kinds or kinds_for(split))
    world = hashlib.sha1(layout.instances(split).read_bytes() + layout.captions(split).read_bytes()).hexdigest()
    want = {"teacher": teacher, "seed": seed, "kinds": list(kinds), "limit": limit, "world_sha1": world}
    if out.exists() and stats_path.exists() and io.read_json(stats_path).get("made_with") == want:
        log.info("instruction data for %s is up to date: %s", split, out)
        return out  # decided from the files' bytes, before parsing any context
    if teacher != "symbolic":
        raise ValueError(f"teacher {teacher!r}: build_split runs the symbolic teacher; use build_chat for an endpoint")
    contexts = load_contexts(layout.instances(split), layout.captions(split))[:limit]
    samples, stats = symbolic.generate(contexts, kinds, seed=seed)
    io.write_json(out, samples)
    io.write_json(
        stats_path,
        {
            "made_with": want,
            "samples": len(samples),
            "per_type": stats,
            "turns": dict(Counter(len(s["conversations"]) // 2 for s in samples)),
        },
        indent=2,
    )
    log.info("%s: %d samples -> %s", split, len(samples), out)
    return out


def build_chat(layout: Layout, split: str, teacher_cfg, limit: int | None = None, progress: bool = True):
    """Ask a chat endpoint or a local chat model (``teacher_cfg.kind``) for the paper's three types;
    appends to ``chat_<split>.jsonl`` (resumable: finished contexts are never asked again).
    Returns the run's statistics."""
    contexts = load_contexts(layout.instances(split), layout.captions(split))[:limit]
    return chat.generate(contexts, layout.instruct / f"chat_{split}.jsonl", teacher_cfg, progress=progress)
