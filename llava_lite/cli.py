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
import shlex
import sys
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from . import (
    ablate,
    chat,
    coco_download,
    export,
    features,
    io,
    jsonl,
    judge,
    released,
    scienceqa,
    stages,
    tutorial,
    validate,
    world,
)
from .config import PRESETS, ScienceQAConfig, TeacherConfig, get_preset
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


def split_sizes(items: list[str]) -> dict[str, int]:
    """``["train=1000", "test=100"]`` -> ``{"train": 1000, "test": 100}`` (the ``--split`` flags)."""
    sizes = {}
    for item in items:
        name, _, n = item.partition("=")
        if not n.isdigit():
            raise ValueError(f"--split {item!r}: expected NAME=N, e.g. train=1000")
        sizes[name] = int(n)
    return sizes


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
        cfg.splits = split_sizes(args.split) if args.split else cfg.splits
        out = args.out or Layout.for_preset(args.preset).world
        counts = world.generate(cfg, out)
        log.info("wrote %s to %s", ", ".join(f"{n} {s}" for s, n in counts.items()), out)

    p.set_defaults(func=run)


def _coco(sub) -> None:
    p = sub.add_parser("coco", help="download COCO 2017 annotations and a chosen number of images (colab/full presets)")
    p.add_argument("--preset", default="colab")
    p.add_argument("--out", help="folder to write (default: outputs/<preset>/world)")
    p.add_argument("--split", action="append", metavar="NAME=N", help="images per split, e.g. --split train=2000")
    p.add_argument("--seed", type=int, help="which images are drawn (default: the preset's)")
    p.add_argument("--url", help="the server of the release (default: images.cocodataset.org)")
    p.add_argument("--md5", help="the annotations archive's MD5 (default: the 2017 release's)")

    def run(args):
        cfg = get_preset(args.preset).world
        cfg.source = "coco"
        cfg.splits = split_sizes(args.split) if args.split else cfg.splits
        cfg.seed = cfg.seed if args.seed is None else args.seed
        cfg.coco_url, cfg.coco_annotations_md5 = args.url or cfg.coco_url, args.md5 or cfg.coco_annotations_md5
        out = args.out or Layout.for_preset(args.preset).world
        counts = coco_download.fetch(cfg, out)
        log.info("COCO: %s in %s", ", ".join(f"{n} {s}" for s, n in counts.items()), out)

    p.set_defaults(func=run)


def _instruct(sub) -> None:
    p = sub.add_parser("instruct", help="write LLaVA-format instruction data from the world's symbolic contexts")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--split", action="append", help="split(s) to build (default: every split of the preset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="only the first N contexts of each split")
    p.add_argument("--teacher", choices=("symbolic", "chat", "local"), default="symbolic")
    p.add_argument("--base-url", help="chat teacher: the OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="chat teacher: the model name the endpoint serves; local: a folder or hub id")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="chat teacher: environment variable holding the key")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8, help="local teacher: prompts generated at once")
    p.add_argument("--temperature", type=float, default=0.2, help="chat and local teachers; 0: greedy")
    p.add_argument("--max-tokens", type=int, default=1024, help="chat and local teachers: longest reply")

    def run(args):
        layout = Layout.for_preset(args.preset)
        if args.teacher == "chat" and not (args.base_url and args.model):
            raise ValueError("--teacher chat needs --base-url and --model")
        if args.teacher == "local" and not args.model:
            raise ValueError("--teacher local needs --model (a folder or a hub id of a chat model)")
        for split in args.split or list(get_preset(args.preset).world.splits):
            if args.teacher in ("chat", "local"):
                cfg = TeacherConfig(
                    kind=args.teacher,
                    base_url=args.base_url or "",
                    model=args.model,
                    api_key_env=args.api_key_env,
                    chat_concurrency=args.concurrency,
                    chat_temperature=args.temperature,
                    chat_max_tokens=args.max_tokens,
                    local_batch_size=args.batch_size,
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


def _released(sub) -> None:
    p = sub.add_parser("released", help="use LLaVA's released JSON (LLaVA-Pretrain, LLaVA-Instruct-150K) as a split")
    p.add_argument("file", type=Path, help="e.g. blip_laion_cc_sbu_558k.json or llava_instruct_150k.json")
    p.add_argument("--images", type=Path, required=True, help="the image folder the file's 'image' paths start from")
    p.add_argument("--stage", type=int, choices=(1, 2), required=True, help="1: caption data; 2: instruction data")
    p.add_argument("--preset", default="colab")
    p.add_argument("--split", default="train")

    def run(args):
        counts = released.import_split(args.file, args.images, Layout.for_preset(args.preset), args.split, args.stage)
        log.info(
            "%s: %s; next: llava-lite features --preset %s --split %s", args.split, counts, args.preset, args.split
        )

    p.set_defaults(func=run)


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


def _judge(sub) -> None:
    p = sub.add_parser(
        "judge", help="the judge score (LLaVA-Bench style): a model's answers rated beside the teacher's"
    )
    p.add_argument("--out", type=Path, required=True, help="folder for the bench files, answers, judgements, scores")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--checkpoint", type=Path, help="the stage-2 checkpoint that answers (default: the latest)")
    p.add_argument("--split", default="test")
    p.add_argument("--images", type=int, default=judge.PAPER_IMAGES, help="images of the split, 3 questions each")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--questions", type=Path, help="score given files (LLaVA-Bench layout) instead of a checkpoint")
    p.add_argument("--context", type=Path, help="with --questions: the context JSONL (captions + instances)")
    p.add_argument("--reference", type=Path, help="with --questions: the reference answers JSONL")
    p.add_argument("--answers", type=Path, help="with --questions: the model's answers JSONL")
    p.add_argument("--base-url", help="endpoint judge: an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="endpoint judge: the model name the endpoint serves")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="endpoint judge: environment variable with the key")
    p.add_argument("--concurrency", type=int, default=4)

    def run(args):
        if bool(args.base_url) != bool(args.model):
            raise ValueError("the endpoint judge needs both --base-url and --model")
        if args.questions:
            if not (args.context and args.reference and args.answers):
                raise ValueError("--questions needs --context, --reference and --answers")
            questions = judge.read_bench(args.questions, args.context, args.reference)
            answers = judge.read_answers(args.answers)
        else:
            questions, answers = judge.checkpoint_answers(
                args.preset, args.checkpoint, args.split, args.images, args.max_new_tokens
            )
            judge.write_bench(questions, args.out)
            jsonl.write_jsonl(args.out / "answers.jsonl", judge.answer_records(questions, answers, "llava-lite"))
        teacher = None
        if args.base_url:
            teacher = TeacherConfig(
                kind="chat",
                base_url=args.base_url,
                model=args.model,
                api_key_env=args.api_key_env,
                chat_concurrency=args.concurrency,
            )
        scores = judge.run_bench(questions, answers, args.out, teacher)
        for name in ("offline", "endpoint"):
            if name in scores:
                got = {k: round(v, 1) for k, v in scores[name]["relative"].items()}
                log.info("%s judge, relative score: %s (paper: %s)", name, got, judge.PAPER)
        log.info("scores in %s", args.out / "scores.json")

    p.set_defaults(func=run)


def _scienceqa(sub) -> None:
    p = sub.add_parser("scienceqa", help="ScienceQA-style multiple choice: write the world's set, train, evaluate")
    inner = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    w = inner.add_parser("write", help="write the world's multiple-choice set in ScienceQA's format")
    w.add_argument("--preset", default="tiny")
    w.add_argument("--out", type=Path, help="the set's folder (default outputs/<preset>/scienceqa)")
    add_config_flags(w, ScienceQAConfig())
    w.set_defaults(
        func=lambda a: log.info(
            "wrote %s", scienceqa.write_world_set(Layout.for_preset(a.preset), a.out, config_from(a, ScienceQAConfig))
        )
    )

    t = inner.add_parser("train", help="stage 2 on the set's train split, from the stage-1 checkpoint")
    t.add_argument("--format", choices=scienceqa.FORMATS, required=True, help="where the answer goes: the ablation")
    t.add_argument("--preset", default="tiny")
    t.add_argument("--out", type=Path, help="run folder (default outputs/<preset>/checkpoints/scienceqa-<format>)")
    t.add_argument("--data", type=Path, help="the set's folder (default outputs/<preset>/scienceqa)")
    t.add_argument("--stage1", type=Path, help="the stage-1 checkpoint (default: the latest stage-1 run)")
    t.add_argument("--no-lecture", action="store_true", help="reason with the solution alone")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--max-steps", type=int, default=0)
    t.add_argument("--batch-size", type=int, help="samples per optimizer step (default: the preset's)")
    t.add_argument("--lr", type=float, help="the projector's learning rate (default: the preset's)")
    t.add_argument("--lm-lr", type=float, help="the language model's learning rate (default: the preset's)")
    t.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None, help="default: the preset's")
    t.add_argument("--seed", type=int, help="the projector's initial weights, LoRA's and the batch order")

    def run_train(a):
        overrides = {"max_steps": a.max_steps} if a.max_steps else {}
        overrides.update({k: getattr(a, k) for k in ("lr", "lm_lr", "batch_size") if getattr(a, k) is not None})
        summary = scienceqa.train_run(
            a.preset, a.format, a.out, a.data, a.stage1, not a.no_lecture, a.resume, a.lora, a.seed, **overrides
        )
        log.info("scienceqa %s done: %s", a.format, {k: summary[k] for k in ("steps", "seconds", "last")})

    t.set_defaults(func=run_train)

    e = inner.add_parser("evaluate", help="multiple-choice accuracy per category, with and without a picture")
    e.add_argument("--checkpoint", type=Path, help="a trained model (not needed with --reader)")
    e.add_argument("--data", type=Path, help="the set's folder: the world's (default) or the official files")
    e.add_argument("--split", default="test")
    e.add_argument("--images", type=Path, help="official files: the folder holding <split>/<pid>/image.png")
    e.add_argument("--reader", action="store_true", help="the language model reading the scene as text instead")
    e.add_argument("--preset", default="tiny")
    e.add_argument("--out", type=Path, help="records and summary (JSON); default beside the checkpoint")
    e.add_argument("--max-new-tokens", type=int, default=128)

    def run_evaluate(a):
        if a.checkpoint is None and not a.reader:
            raise ValueError("scienceqa evaluate needs --checkpoint (or --reader)")
        s = scienceqa.evaluate_run(a.preset, a.checkpoint, a.data, a.split, a.images, a.out, a.reader, a.max_new_tokens)
        log.info(
            "scienceqa %s: %.3f (%d unparseable) %s %s",
            a.split,
            s["overall"],
            s["unparseable"],
            {k: round(v, 3) for k, v in s["accuracy"].items()},
            {k: round(v, 3) for k, v in s["image"].items()},
        )

    e.set_defaults(func=run_evaluate)


def _ablate(sub) -> None:
    p = sub.add_parser("ablate", help="the paper's ablations in miniature: each row retrained over seeds, one table")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--out", type=Path, help="results folder (default outputs/<preset>/ablate)")
    p.add_argument("--rows", nargs="*", help=f"rows to run (default all: {[r.name for r in ablate.ROWS]})")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    p.add_argument("--data", type=Path, help="the multiple-choice set (default: the world's, written when missing)")
    p.add_argument("--stage1-steps", type=int, default=0, help="a reduced run: stage-1 steps (0: the preset's)")
    p.add_argument("--stage2-steps", type=int, default=0, help="a reduced run: stage-2 steps (0: the preset's)")
    p.add_argument("--eval-limit", type=int, default=0, help="a reduced run: questions of each score (0: all)")
    p.add_argument("--batch-size", type=int, default=0, help="a reduced run: both stages' batch size (0: the preset's)")
    p.add_argument("--report", type=Path, help="also write the results file (markdown) here")
    p.add_argument("--jobs", type=int, default=1, help="units trained at once, each with cores/jobs threads")

    def run(args):
        t0 = time.perf_counter()
        rows = [ablate.row_named(n) for n in args.rows] if args.rows else ablate.ROWS
        out = args.out or Layout.for_preset(args.preset).root / "ablate"
        reduced = {k: getattr(args, k) for k in ("stage1_steps", "stage2_steps", "eval_limit", "batch_size")}
        results = ablate.run(args.preset, out, rows, args.seeds, args.data, jobs=args.jobs, **reduced)
        seconds = time.perf_counter() - t0
        text = ablate.report(results, "llava-lite " + shlex.join(args.argv), seconds, time.strftime("%Y-%m-%d"))
        io.write_text(out / "report.md", text)
        if args.report:
            io.write_text(args.report, text)
        print(text)
        log.info("ablations done in %.1f min; report in %s", seconds / 60, out / "report.md")

    p.set_defaults(func=run)


def _export(sub) -> None:
    p = sub.add_parser("export", help="a stage-2 checkpoint as a Hugging Face Llava folder (for transformers serve)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--checkpoint", type=Path, help="default: the latest stage-2 checkpoint")
    p.add_argument("--out", type=Path, required=True, help="folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is not empty")

    def run(args):
        out = export.export(args.checkpoint, args.out, args.preset, overwrite=args.overwrite)
        log.info("serve it: transformers serve %s --host 127.0.0.1 --port 8000", out)

    p.set_defaults(func=run)


def _chat(sub) -> None:
    p = sub.add_parser("chat", help="talk with a trained model about one image (replies stream; greedy by default)")
    p.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint folder, or a run folder (its latest)")
    p.add_argument("--image", type=Path, required=True, help="any image file: JPEG, PNG, ... of any size or mode")
    p.add_argument("--preset", default="tiny", help="the preset the checkpoint was trained with")
    p.add_argument("--question", help="answer this one question and exit (default: chat on stdin)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy; above 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="sampling: the nucleus' probability mass")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, help="sampling: the random seed (repeatable replies)")
    p.add_argument("--device", default="cpu")

    def run(args):
        if not args.verbose:  # a conversation on the terminal, without the loaders' notes and progress bars
            logging.getLogger().setLevel(logging.WARNING)
            logging.getLogger("llava_lite").setLevel(logging.INFO)
            hf_logging.disable_progress_bar()
        if args.seed is not None:
            torch.manual_seed(args.seed)
        session = chat.ChatSession.from_checkpoint(args.checkpoint, args.preset, args.image, args.device)
        sampling = {"temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens}
        return chat.terminal(session, args.question, **sampling)

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


COMMANDS = (
    _world,
    _coco,
    _instruct,
    _validate,
    _released,
    _backbones,
    _features,
    _train,
    _evaluate,
    _judge,
    _scienceqa,
    _ablate,
    _export,
    _chat,
    _tutorial,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-lite", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for declare in COMMANDS:
        declare(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "preset", None) is not None and args.preset not in PRESETS:  # before any work is done
        parser.error(f"unknown preset {args.preset!r}; expected one of {sorted(PRESETS)}")
    args.argv = argv  # the command line as given, for results files that say what made them
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
