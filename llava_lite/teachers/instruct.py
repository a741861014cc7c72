"""Instruction data for every split: symbolic contexts in, LLaVA-format JSON out.

    outputs/<preset>/instruct/<split>.json        a JSON list of LLaVA samples (all types)
    outputs/<preset>/instruct/<split>.stats.json  samples per type, and what was left out

The ``pretrain`` split gets ``caption`` and ``exact`` samples only (the tiny language model's
reading text); the other splits get every type.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from .. import io
from ..coco import load_contexts
from ..paths import Layout
from . import symbolic

log = logging.getLogger(__name__)

PRETRAIN_KINDS = ("caption", "exact")


def kinds_for(split: str) -> tuple[str, ...]:
    return PRETRAIN_KINDS if split == "pretrain" else symbolic.TYPES


def build_split(layout: Layout, split: str, seed: int = 0, teacher: str = "symbolic", limit: int | None = None,
                kinds: tuple[str, ...] | None = None) -> Path:
    """Write ``<split>.json`` (kept as it is when it already holds this split's samples)."""
    out = layout.instruct / f"{split}.json"
    stats_path = layout.instruct / f"{split}.stats.json"
    kinds = tuple(kinds or kinds_for(split))
    contexts = load_contexts(layout.instances(split), layout.captions(split))[:limit]
    want = {"teacher": teacher, "seed": seed, "kinds": list(kinds), "contexts": len(contexts)}
    if out.exists() and stats_path.exists() and io.read_json(stats_path).get("made_with") == want:
        log.info("instruction data for %s is up to date: %s", split, out)
        return out
    if teacher != "symbolic":
        raise ValueError(f"teacher {teacher!r}: this command runs the offline symbolic teacher; "
                         "for a chat endpoint use `llava-lite chat-teacher` (see notebook 01)")
    samples, stats = symbolic.generate(contexts, kinds, seed=seed)
    io.write_json(out, samples)
    io.write_json(stats_path, {"made_with": want, "samples": len(samples), "per_type": stats,
                               "turns": dict(Counter(len(s["conversations"]) // 2 for s in samples))}, indent=2)
    log.info("%s: %d samples -> %s", split, len(samples), out)
    return out


def register_cli(sub) -> None:
    p = sub.add_parser("instruct", help="write LLaVA-format instruction data from the world's symbolic contexts")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--split", action="append", help="split(s) to build (default: every split of the preset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="only the first N contexts of each split")

    def run(args):
        from ..config import get_preset

        layout = Layout.for_preset(args.preset)
        for split in args.split or list(get_preset(args.preset).world.splits):
            build_split(layout, split, seed=args.seed, limit=args.limit)

    p.set_defaults(func=run)
