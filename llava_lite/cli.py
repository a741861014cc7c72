"""The ``llava-lite`` command: every sub-command is declared here, in the order the tutorial uses them.

Each command is a parser and a few lines that call the module doing the work. This is the one
module that sees both the core and the lab: ``backbones lm`` and ``backbones clip`` run the lab's
recipes behind the shipped tiny backbones, their flags made from the lab's config dataclasses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from . import features, stages, tutorial, validate, world
from .config import PRESETS, TeacherConfig, get_preset
from .lab import clip as lab_clip
from .lab import lm as lab_lm
from .lab.config import (
    ClipArchitecture,
    ClipRuntime,
    ClipTexts,
    ClipTraining,
    LMArchitecture,
    LMDocuments,
    LMRuntime,
    LMTraining,
)
from .paths import PRETRAINED_DIR, Layout
from .teachers import instruct
from .vision import VisionTower

log = logging.getLogger("llava_lite")


# ------------------------------------------------------------------ flags from config dataclasses
def add_config_flags(parser: argparse.ArgumentParser, *configs) -> None:
    """One ``--field-name`` flag per field of each config dataclass, defaulting to its value
    (booleans as ``--flag/--no-flag``, ``None`` or dict defaults as JSON)."""
    for cfg in configs:
        for f in dataclasses.fields(cfg):
            value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
            elif value is None or isinstance(value, dict):
                parser.add_argument(flag, type=json.loads, default=value, metavar="JSON")
            else:
                parser.add_argument(flag, type=type(value), default=value)


def config_from(args: argparse.Namespace, cls):
    """An instance of config dataclass ``cls`` from the parsed flags of :func:`add_config_flags`."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def command_line(args: argparse.Namespace, *configs) -> str:
    """The ``llava-lite backbones ...`` line that reproduces a run: every config flag written out."""
    parts = ["llava-lite", "backbones", args.backbone]
    for cfg in configs:
        for f in dataclasses.fields(cfg):
            value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                parts.append(flag if value else "--no-" + flag[2:])
            elif value not in ("", None):
                parts += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return " ".join(
        parts + [f"--preset {args.preset}"] + ([f"--world {args.world}"] if args.world else []) + [f"--out {args.out}"]
    )


# ------------------------------------------------------------------ the commands
def _world(sub) -> None:
    p = sub.add_parser("world", help="generate the shapes world as COCO-format files")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--out", help="folder to write (default: outputs/<preset>/world)")
    p.add_argument("--seed", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument(
        "--split",
        action="append",
        metavar="NAME=N",
        help="scenes per split, e.g. --split train=1000 (repeatable; default: the preset's)",
    )

    def run(args):
        cfg = get_preset(args.preset).world
        cfg.seed = cfg.seed if args.seed is None else args.seed
        cfg.image_size = args.image_size or cfg.image_size
        if args.split:
            cfg.splits = {}
            for item in args.split:
                name, _, n = item.partition("=")
                if not n.isdigit():
                    raise ValueError(f"--split {item!r}: expected NAME=N, e.g. train=1000")
                cfg.splits[name] = int(n)
        out = args.out or Layout.for_preset(args.preset).world
        counts = world.generate(cfg, out)
        log.info("wrote %s to %s", ", ".join(f"{n} {s}" for s, n in counts.items()), out)

    p.set_defaults(func=run)


def _instruct(sub) -> None:
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
        layout = Layout.for_preset(args.preset)
        if args.teacher == "chat" and not (args.base_url and args.model):
            raise ValueError("--teacher chat needs --base-url and --model")
        for split in args.split or list(get_preset(args.preset).world.splits):
            if args.teacher == "chat":
                cfg = TeacherConfig(
                    kind="chat",
                    base_url=args.base_url,
                    model=args.model,
                    api_key_env=args.api_key_env,
                    chat_concurrency=args.concurrency,
                )
                log.info("%s: %s", split, instruct.build_chat(layout, split, cfg, args.limit).summary())
            else:
                instruct.build_split(layout, split, seed=args.seed, limit=args.limit)

    p.set_defaults(func=run)


def _validate(sub) -> None:
    p = sub.add_parser(
        "validate", help="check a LLaVA-format JSON / JSONL file", description=validate.__doc__.split("\n\n")[0]
    )
    p.add_argument("file", type=Path, help="a JSON list of samples or JSON Lines")
    p.add_argument("--images", type=Path, help="image folder: check that every sample's image exists")
    p.add_argument("--max-problems", type=int, default=0, help="report at most this many problems (0: all)")
    p.set_defaults(func=lambda args: validate.report_file(args.file, args.images, args.max_problems))


def _backbones(sub) -> None:
    p = sub.add_parser("backbones", help="pretrain the tiny backbones (lm: tokenizer + Llama; clip: tiny CLIP)")
    inner = p.add_subparsers(dest="backbone", required=True, metavar="BACKBONE")

    lm = inner.add_parser("lm", help="train the BPE tokenizer and pretrain the tiny Llama to read contexts")
    lm.add_argument("--out", required=True, help="folder for the model, tokenizer, log and metrics")
    lm.add_argument("--world", help="world folder with a pretrain split (default: outputs/<preset>/world)")
    lm.add_argument("--preset", default="tiny")
    lm.add_argument("--eval-split", default="test")
    lm_configs = (LMArchitecture, LMDocuments, LMTraining, LMRuntime)
    add_config_flags(lm, *(cls() for cls in lm_configs))

    def run_lm(args):
        lab_lm.train_and_report(
            args.out,
            *(config_from(args, cls) for cls in lm_configs),
            world=args.world,
            preset=args.preset,
            eval_split=args.eval_split,
        )

    lm.set_defaults(func=run_lm)

    clip = inner.add_parser("clip", help="pretrain the tiny CLIP on the world's pretrain split")
    clip.add_argument("--preset", default="tiny")
    clip.add_argument("--world", help="world folder (default: outputs/<preset>/world, generated if missing)")
    clip.add_argument("--out", default=str(PRETRAINED_DIR / "tiny-clip"))
    clip_configs = (ClipArchitecture, ClipTexts, ClipTraining, ClipRuntime)
    add_config_flags(clip, *(cls() for cls in clip_configs))

    def run_clip(args):
        configs = [config_from(args, cls) for cls in clip_configs]
        m = lab_clip.train_and_report(
            Path(args.out), *configs, preset=args.preset, world=args.world, command=command_line(args, *configs)
        )
        log.info(
            "tiny CLIP written to %s: r@1 %.3f, shape probe %.3f",
            args.out,
            m["retrieval"]["r@1"],
            m["probe_layer-2"]["shape"]["accuracy"],
        )

    clip.set_defaults(func=run_clip)


def _features(sub) -> None:
    p = sub.add_parser("features", help="cache a frozen vision tower's patch features for a split")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--split", action="append", help="split name (repeatable; default: train)")
    p.add_argument("--encoder", help="open_clip model name or folder (default: the preset's)")
    p.add_argument("--pretrained", help="open_clip pretrained tag, e.g. openai")
    p.add_argument("--layer", type=int, help="transformer block whose output to take (default -2, penultimate)")
    p.add_argument("--keep-cls", action="store_true", help="keep the CLS token in front of the patches")
    p.add_argument("--world", help="folder with annotations/ and image folders (default: the preset's world)")
    p.add_argument("--out", help="features root (default: outputs/<preset>/features)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=512)
    p.add_argument("--device", default="cpu")

    def run(args):
        vcfg, layout = get_preset(args.preset).vision, Layout.for_preset(args.preset)
        tower = VisionTower.load(
            args.encoder or vcfg.encoder,
            args.pretrained if args.encoder else vcfg.pretrained,
            layer=vcfg.layer if args.layer is None else args.layer,
            keep_cls=args.keep_cls or vcfg.keep_cls,
            device=args.device,
        )
        world_dir = Path(args.world) if args.world else layout.world
        root = Path(args.out) if args.out else layout.features
        for split in args.split or ["train"]:
            folder = features.extract(
                tower,
                world_dir / "annotations" / f"instances_{split}.json",
                world_dir / split,
                features.cache_folder(root, tower, split),
                batch_size=args.batch_size,
                shard_size=args.shard_size,
            )
            log.info("features of %s (%s) in %s", split, tower.cache_key, folder)

    p.set_defaults(func=run)


def _train(sub) -> None:
    p = sub.add_parser("train", help="stage 1 (projector) or stage 2 (projector + language model)")
    p.add_argument("--stage", type=int, choices=(1, 2), required=True)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--out", type=Path, help="run folder (default outputs/<preset>/checkpoints/stage<N>)")
    p.add_argument("--stage1", type=Path, help="stage 2: the stage-1 checkpoint (default: the latest stage-1 run)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--max-steps", type=int, default=0)
    p.add_argument("--batch-size", type=int, help="samples per optimizer step (default: the preset's)")
    p.add_argument("--lr", type=float, help="the projector's learning rate (default: the preset's)")
    p.add_argument("--lm-lr", type=float, help="stage 2: the language model's learning rate (default: the preset's)")
    p.add_argument(
        "--lora",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="stage 2: LoRA adapters (default: the preset's)",
    )
    p.add_argument("--blind", action="store_true", help="train without image tokens (the blind baseline)")
    p.add_argument(
        "--seed", type=int, help="the projector's initial weights, LoRA's and the batch order (default: the preset's)"
    )

    def run(args):
        overrides = {"max_steps": args.max_steps} if args.max_steps else {}
        overrides.update({k: getattr(args, k) for k in ("lr", "lm_lr", "batch_size") if getattr(args, k) is not None})
        summary = stages.train_stage(
            args.preset, args.stage, args.out, args.stage1, args.resume, args.blind, args.lora, args.seed, **overrides
        )
        log.info("stage %d done: %s", args.stage, {k: summary[k] for k in ("steps", "seconds", "last")})

    p.set_defaults(func=run)


def _evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="the exact-answer score of a trained model on a split")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--checkpoint", type=Path, help="default: the latest stage-2 checkpoint")
    p.add_argument("--split", default="test")
    p.add_argument("--out", type=Path, help="per-question records (JSON); default beside the checkpoint")
    p.add_argument("--blind", action="store_true", help="a blind baseline's checkpoint, asked without image tokens")

    def run(args):
        summary = stages.evaluate_checkpoint(args.preset, args.checkpoint, args.split, args.out, args.blind)
        log.info(
            "exact-answer accuracy on %s: %.3f %s",
            args.split,
            summary["overall"],
            {k: round(v, 3) for k, v in summary["accuracy"].items()},
        )

    p.set_defaults(func=run)


def _tutorial(sub) -> None:
    p = sub.add_parser("tutorial", help="run every notebook headless into outputs/notebooks/")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--out", type=Path, help="folder for the executed notebooks (default outputs/notebooks)")
    p.add_argument("--only", nargs="*", help="run only notebooks whose names start with these (e.g. 00 01)")

    def run(args):
        timings = tutorial.run_all(args.preset, args.out, args.only)
        log.info("tutorial done: %d notebooks in %.1f min", len(timings), sum(timings.values()) / 60)

    p.set_defaults(func=run)


COMMANDS = (_world, _instruct, _validate, _backbones, _features, _train, _evaluate, _tutorial)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-lite", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for declare in COMMANDS:
        declare(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "preset", None) is not None and args.preset not in PRESETS:  # before any work is done
        parser.error(f"unknown preset {args.preset!r}; expected one of {sorted(PRESETS)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        log.error("%s", e)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C: a long job has kept what it finished
        log.error("interrupted%s", f": {e}" if str(e) else "")
        return 130


if __name__ == "__main__":
    sys.exit(main())
