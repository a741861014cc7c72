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
    world = hashlib.sha1(layout.instances(split).read_bytes() + layout.captions(split).read_bytes()).hexdigest()
    want = {"teacher": teacher, "seed": seed, "kinds": list(kinds), "contexts": len(contexts), "world_sha1": world}
    if out.exists() and stats_path.exists() and io.read_json(stats_path).get("made_with") == want:
        log.info("instruction data for %s is up to date: %s", split, out)
        return out
    if teacher != "symbolic":
        raise ValueError(f"teacher {teacher!r}: build_split runs the symbolic teacher; use build_chat for an endpoint")
    samples, stats = symbolic.generate(contexts, kinds, seed=seed)
    io.write_json(out, samples)
    io.write_json(stats_path, {"made_with": want, "samples": len(samples), "per_type": stats,
                               "turns": dict(Counter(len(s["conversations"]) // 2 for s in samples))}, indent=2)
    log.info("%s: %d samples -> %s", split, len(samples), out)
    return out


def build_chat(layout: Layout, split: str, teacher_cfg, limit: int | None = None, progress: bool = True):
    """Ask a chat endpoint for the paper's three types; appends to ``chat_<split>.jsonl``
    (resumable: finished contexts are never asked again). Returns the run's statistics."""
    from . import chat

    contexts = load_contexts(layout.instances(split), layout.captions(split))[:limit]
    return chat.generate(contexts, layout.instruct / f"chat_{split}.jsonl", teacher_cfg, progress=progress)


def register_cli(sub) -> None:
    p = sub.add_parser("instruct", help="write LLaVA-format instruction data from the world's symbolic contexts")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--split", action="append", help="split(s) to build (default: every split of the preset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="only the first N contexts of each split")
    p.add_argument("--teacher", choices=("symbolic", "chat"), default="symbolic")
    p.add_argument("--base-url", help="chat teacher: the OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="chat teacher: the model name the endpoint serves")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="chat teacher: environment variable holding the key")
    p.add_argument("--concurrency", type=int, default=4)

    def run(args):
        from ..config import TeacherConfig, get_preset

        layout = Layout.for_preset(args.preset)
        for split in args.split or list(get_preset(args.preset).world.splits):
            if args.teacher == "chat":
                if not (args.base_url and args.model):
                    raise ValueError("--teacher chat needs --base-url and --model")
                cfg = TeacherConfig(kind="chat", base_url=args.base_url, model=args.model, api_key_env=args.api_key_env,
                                    chat_concurrency=args.concurrency)
                stats = build_chat(layout, split, cfg, args.limit)
                log.info("%s: %s", split, stats.summary())
            else:
                build_split(layout, split, seed=args.seed, limit=args.limit)

    p.set_defaults(func=run)
