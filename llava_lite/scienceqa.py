"""ScienceQA-style multiple choice, as the paper fine-tuned and scored LLaVA on it (§5.2).

ScienceQA ships two files: ``problems.json`` (pid -> question, choices, answer index, hint,
image, lecture, solution, split and labels such as subject and category) and ``pid_splits.json``
(split -> pids); a problem's picture lies at ``<images>/<split>/<pid>/image.png``. This module
reads and writes that format, and writes one of its own from the shapes world: for each scene of
the world's ``train``/``val``/``test`` splits, questions whose answer needs the picture (count,
colour, shape, position, size; :mod:`llava_lite.teachers.choices`) with 2-5 choices, answer
letters balanced, and some asked with a text-only hint instead of the image, as ScienceQA has.
Its pictures are the world's own (a problem's ``world_image`` names the file), so the world's
feature cache serves it.

A question is asked as the reference code asked it::

    Context: {hint, or N/A}
    Question: {question}
    Options: (A) red (B) blue (C) green

and stage 2 learns one of two answers (the paper's chain-of-thought ablation, 90.92 vs 89.77):

- ``reasoning-first``: ``{lecture} {solution} The answer is B.``
- ``answer-first``: ``The answer is B. BECAUSE: {lecture} {solution}``

A reply is read with the reference's rules: "The answer is X." (here found once, or repeated
with the same letter), else a bare letter (``B``, ``(B)``), else a reply opening with ``B. ...``.
Anything else, two different letters, a lower-case letter or a letter beyond the choices is
unparseable: wrong, and counted.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from . import io, stages
from .coco import SymbolicContext, load_contexts
from .config import ScienceQAConfig, get_preset
from .conversation import IMAGE_TOKEN, Template, get_template
from .generate import model_replies, question_prompt
from .paths import Layout
from .scene_text import reading_context, reading_layout
from .teachers import choices
from .train import latest_checkpoint, make_accelerator

log = logging.getLogger(__name__)

LETTERS = "ABCDE"
FORMATS = ("reasoning-first", "answer-first")
WORLD_SPLITS = ("train", "val", "test")


class ScienceQAFormatError(ValueError):
    """A ``problems.json`` / ``pid_splits.json`` that does not say what it should (names the pid and field)."""


# ------------------------------------------------------------------ the format
@dataclass
class Problem:
    """One multiple-choice problem; ``answer`` indexes ``choices``. Keys the format does not
    name (``world_image``, a caption, ...) travel in ``extra``."""

    pid: str
    question: str
    choices: list[str]
    answer: int
    hint: str = ""
    image: str | None = None  # the file in <images>/<split>/<pid>/, or None: no picture
    task: str = "closed choice"
    grade: str = ""
    subject: str = ""
    topic: str = ""
    category: str = ""
    skill: str = ""
    lecture: str = ""
    solution: str = ""
    split: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def letter(self) -> str:
        return LETTERS[self.answer]

    @property
    def image_key(self) -> str | None:
        """How a feature lookup names this problem's picture: the world file it reuses
        (``test/000000000501.png``) or ``<split>/<pid>/<image>``; ``None`` without one."""
        if not self.image:
            return None
        return self.extra.get("world_image") or f"{self.split}/{self.pid}/{self.image}"

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("pid")
        return {**{k: v for k, v in d.items() if k != "extra"}, **self.extra}


_STR_FIELDS = ("question", "hint", "task", "grade", "subject", "topic", "category", "skill", "lecture", "solution")
_REQUIRED = ("question", "choices", "answer", "split")


def problem_from_json(pid: str, d, where: str = "problems.json") -> Problem:
    """A checked :class:`Problem`; a missing or ill-typed field raises, naming the pid and field."""
    if not isinstance(d, dict):
        raise ScienceQAFormatError(f"{where}: pid {pid}: expected an object, found {type(d).__name__}")
    for k in _REQUIRED:
        if k not in d:
            raise ScienceQAFormatError(f"{where}: pid {pid}: missing field {k!r} (has {sorted(d)})")
    choices = d["choices"]
    if not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
        raise ScienceQAFormatError(f"{where}: pid {pid}: field 'choices' should be a list of strings: {choices!r}")
    if not 2 <= len(choices) <= len(LETTERS):
        raise ScienceQAFormatError(f"{where}: pid {pid}: field 'choices' has {len(choices)} choices, expected 2-5")
    answer = d["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ScienceQAFormatError(
            f"{where}: pid {pid}: field 'answer' should be an index into the {len(choices)} choices, found {answer!r}"
        )
    for k in (*_STR_FIELDS, "split"):
        if k in d and not isinstance(d[k], str):
            raise ScienceQAFormatError(f"{where}: pid {pid}: field {k!r} should be a string, found {d[k]!r}")
    image = d.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise ScienceQAFormatError(f"{where}: pid {pid}: field 'image' should be a file name or null, found {image!r}")
    known = {f.name for f in fields(Problem)} - {"pid", "extra"}
    kwargs = {k: d[k] for k in known if k in d}
    return Problem(pid=str(pid), extra={k: v for k, v in d.items() if k not in known}, **kwargs)


def read_problems(folder: str | Path) -> tuple[dict[str, Problem], dict[str, list[str]]]:
    """``problems.json`` and ``pid_splits.json`` of ``folder``: every problem by pid, and the pids of each split."""
    folder = Path(folder)
    path, splits_path = folder / "problems.json", folder / "pid_splits.json"
    for p in (path, splits_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: not found (a ScienceQA folder holds problems.json and pid_splits.json)")
    doc = io.read_json(path)
    if not isinstance(doc, dict):
        raise ScienceQAFormatError(f"{path}: expected an object pid -> problem, found {type(doc).__name__}")
    problems = {str(pid): problem_from_json(str(pid), d, str(path)) for pid, d in doc.items()}
    splits = io.read_json(splits_path)
    if not isinstance(splits, dict):
        raise ScienceQAFormatError(f"{splits_path}: expected an object split -> list of pids")
    for split, pids in splits.items():
        if not isinstance(pids, list):
            raise ScienceQAFormatError(f"{splits_path}: split {split!r} should be a list of pids")
        missing = [str(p) for p in pids if str(p) not in problems]
        if missing:
            raise ScienceQAFormatError(f"{splits_path}: split {split!r} lists pid {missing[0]}, which {path} lacks")
    return problems, {s: [str(p) for p in pids] for s, pids in splits.items()}


def read_split(folder: str | Path, split: str) -> list[Problem]:
    """The problems of one split, in ``pid_splits.json`` order."""
    problems, splits = read_problems(folder)
    if split not in splits:
        raise ValueError(f"{Path(folder) / 'pid_splits.json'}: no split {split!r}; it has {sorted(splits)}")
    return [problems[p] for p in splits[split]]


def write_problems(folder: str | Path, problems: Sequence[Problem]) -> None:
    """Write ``problems.json`` and ``pid_splits.json`` (each atomically; the splits last, so they
    never name a problem the other file lacks)."""
    folder = Path(folder)
    splits: dict[str, list[str]] = defaultdict(list)
    for p in problems:
        splits[p.split].append(p.pid)
    io.write_json(folder / "problems.json", {p.pid: p.to_json() for p in problems}, indent=1)
    io.write_json(folder / "pid_splits.json", dict(splits), indent=1)


# ------------------------------------------------------------------ the world's set
class _Positions:
    """Answer positions dealt from shuffled cycles, one cycle per number of choices: over a split
    every letter answers as often as every other (within one)."""

    def __init__(self, rng: random.Random):
        self.rng, self.left = rng, defaultdict(list)

    def next(self, n: int) -> int:
        if not self.left[n]:
            self.left[n] = self.rng.sample(range(n), n)
        return self.left[n].pop()


def world_problems(
    contexts: Sequence[SymbolicContext], split: str, cfg: ScienceQAConfig, first_pid: int = 1
) -> list[Problem]:
    """Multiple-choice problems about a world split's scenes (``cfg.questions_per_scene`` each,
    of different categories), pids counted from ``first_pid``; the same seed gives the same set."""
    positions = _Positions(random.Random(f"{cfg.seed}:scienceqa:{split}:positions"))
    asked: Counter = Counter()
    out: list[Problem] = []
    for ctx in contexts:
        rng = random.Random(f"{cfg.seed}:scienceqa:{split}:{ctx.image_id}")
        order = sorted(choices.CATEGORIES, key=lambda c: (asked[c], rng.random()))  # the least asked first
        made = choices.questions(ctx.objects, rng, order, cfg.questions_per_scene)
        asked.update(q.category for q in made)
        for q in made:
            n = rng.randint(2, min(q.max_choices, 1 + len(q.distractors)))
            pos = positions.next(n)
            wrong = q.distractors[: n - 1]
            options = wrong[:pos] + [q.answer] + wrong[pos:]
            text_only = q.hint_ok and rng.random() < cfg.hint_share
            pid = str(first_pid + len(out))
            out.append(
                Problem(
                    pid=pid,
                    question=q.question,
                    choices=options,
                    answer=pos,
                    hint=choices.scene_hint(ctx.objects) if text_only else "",
                    image=None if text_only else "image.png",
                    grade=choices.GRADES[q.category],
                    subject=choices.SUBJECTS[q.category],
                    topic="shapes world",
                    category=q.category,
                    skill=choices.SKILLS[q.category],
                    lecture=choices.LECTURES[q.category],
                    solution=q.solution,
                    split=split,
                    extra={"world_image": f"{split}/{ctx.file_name}"},
                )
            )
    return out


def _world_digest(layout: Layout, splits: Sequence[str]) -> dict[str, str]:
    return {s: hashlib.sha1(layout.instances(s).read_bytes()).hexdigest() for s in splits}


def write_world_set(
    layout: Layout, out: str | Path | None = None, cfg: ScienceQAConfig | None = None, splits=WORLD_SPLITS
) -> dict[str, int]:
    """Write the world's multiple-choice set in ScienceQA's format to ``out`` (default
    ``outputs/<preset>/scienceqa``), with ``info.json`` recording the world it was made from.
    Returns the problems per split."""
    cfg = cfg or ScienceQAConfig()
    out = Path(out) if out else layout.scienceqa
    problems: list[Problem] = []
    for split in splits:
        if not layout.instances(split).exists():
            raise FileNotFoundError(f"{layout.instances(split)}: no {split} split yet (run `llava-lite world` first)")
        contexts = load_contexts(layout.instances(split), layout.captions(split))
        problems += world_problems(contexts, split, cfg, first_pid=len(problems) + 1)
    write_problems(out, problems)
    io.write_json(
        out / "info.json",
        {"world": str(layout.world), "world_sha1": _world_digest(layout, splits), "config": asdict(cfg)},
        indent=1,
    )
    counts = {s: sum(p.split == s for p in problems) for s in splits}
    log.info("scienceqa set: %s -> %s", counts, out)
    return counts


def check_world(data: str | Path, layout: Layout) -> None:
    """Refuse a world set whose world has been redrawn since (its pictures would not match)."""
    info_path = Path(data) / "info.json"
    if not info_path.is_file():
        return  # not a world set (the official files)
    info = io.read_json(info_path)
    if info["world_sha1"] != _world_digest(layout, list(info["world_sha1"])):
        raise ValueError(f"{info_path}: the world under {layout.world} changed since this set was written; rewrite it")


# ------------------------------------------------------------------ prompts and targets
def prompt_text(p: Problem) -> str:
    """The question as the reference code asked it: context (``N/A`` when empty), question, lettered options."""
    options = " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(p.choices))
    return f"Context: {p.hint.strip() or 'N/A'}\nQuestion: {p.question}\nOptions: {options}"


def target_text(p: Problem, answer_format: str, lecture: bool = True) -> str:
    """What stage 2 learns to say: the reasoning (lecture, solution) before or after ``The answer is X.``"""
    reasoning = " ".join(t.strip() for t in ((p.lecture if lecture else ""), p.solution) if t.strip())
    if answer_format == "reasoning-first":
        return f"{reasoning} The answer is {p.letter}.".strip()
    if answer_format == "answer-first":
        return f"The answer is {p.letter}." + (f" BECAUSE: {reasoning}" if reasoning else "")
    raise ValueError(f"unknown answer format {answer_format!r}; expected one of {FORMATS}")


def to_samples(problems: Sequence[Problem], answer_format: str, lecture: bool = True) -> list[dict]:
    """LLaVA-format stage-2 samples (``<image>`` first when the problem has a picture), for :func:`stages.run_stage`."""
    out = []
    for p in problems:
        human = f"{IMAGE_TOKEN}\n{prompt_text(p)}" if p.image else prompt_text(p)
        sample = {"id": f"sqa-{p.pid}", "type": "scienceqa", "category": p.category}
        if p.image:
            sample["image"] = p.image_key
        sample["conversations"] = [
            {"from": "human", "value": human},
            {"from": "gpt", "value": target_text(p, answer_format, lecture)},
        ]
        out.append(sample)
    return out


# ------------------------------------------------------------------ reading a reply
_PHRASE = re.compile(r"the answer is\s*\(?([A-Za-z])\)?(?![A-Za-z])", re.IGNORECASE)
_BARE = re.compile(r"\(?([A-Z])\)?\.?")
_OPENING = re.compile(r"(?:\(([A-Z])\)|([A-Z])\.)\s")


def parse_answer(reply: str, n_choices: int) -> str | None:
    """The option letter a reply gives, or ``None`` (unparseable: no letter, two different ones,
    a lower-case one, or one beyond the ``n_choices`` options)."""
    text = reply.strip()
    said = {m.group(1) for m in _PHRASE.finditer(text)}
    if said:
        letter = said.pop() if len(said) == 1 else None
    elif m := _BARE.fullmatch(text):
        letter = m.group(1)
    elif m := _OPENING.match(text):
        letter = m.group(1) or m.group(2)
    else:
        letter = None
    return letter if letter and letter in LETTERS[:n_choices] else None


# ------------------------------------------------------------------ features of the pictures
def world_features(layout: Layout, tower, splits: Sequence[str]) -> Callable[[str], torch.Tensor]:
    """Features of a world picture named ``<split>/<file>``, from the world's own cache of each split."""
    readers = {s: stages.split_features(layout, s, tower, progress=False) for s in splits}

    def features(key: str) -> torch.Tensor:
        split, _, name = key.partition("/")
        if split not in readers:
            raise KeyError(f"{key}: its split {split!r} is not among the loaded feature caches {sorted(readers)}")
        return readers[split](name)

    return features


def image_features(tower, problems: Sequence[Problem], images: str | Path, batch_size: int = 64) -> dict:
    """The pictures of official problems (``<images>/<split>/<pid>/<image>``) run through ``tower``,
    by :attr:`Problem.image_key`."""
    with_image = [p for p in problems if p.image]
    paths = [Path(images) / p.image_key for p in with_image]
    for p, path in zip(with_image, paths):
        if not path.is_file():
            raise FileNotFoundError(f"pid {p.pid}: its image {path} does not exist")
    feats = tower.encode(paths, batch_size) if paths else []  # [N, P, D]
    return {p.image_key: f for p, f in zip(with_image, feats)}


# ------------------------------------------------------------------ scoring
def mc_replies(
    model,
    tokenizer,
    template: Template,
    problems: Sequence[Problem],
    features,
    batch_size: int = 64,
    max_new_tokens: int = 128,
    progress: bool = False,
) -> list[str]:
    """LLaVA's greedy replies: the picture's features where a problem has one, the text alone where not."""
    prompts = [question_prompt(model, template, prompt_text(p), p.pid, image=bool(p.image)) for p in problems]

    def extras(idx):
        keys = [problems[i].image_key for i in idx if problems[i].image]
        return {"image_features": torch.stack([features(k) for k in keys])} if keys else {}

    return model_replies(model, tokenizer, prompts, batch_size, max_new_tokens, extras, progress=progress)


def reader_replies(
    lm,
    tokenizer,
    template: Template,
    problems: Sequence[Problem],
    contexts: dict,
    batch_size: int = 64,
    max_new_tokens: int = 128,
    progress: bool = False,
) -> list[str]:
    """The text-only reader's replies: the language model alone, the scene as text (its reading
    layout) where LLaVA puts the picture, the hint alone where a problem has none."""
    layout = reading_layout(tokenizer)

    def text(p: Problem) -> str:
        if not p.image:
            return prompt_text(p)
        if p.image_key not in contexts:
            raise KeyError(f"pid {p.pid}: no symbolic context for its image {p.image_key}")
        return f"{reading_context(contexts[p.image_key], layout)}\n{prompt_text(p)}"

    prompts = [template.prompt([{"from": "human", "value": text(p)}], p.pid) for p in problems]
    return model_replies(lm, tokenizer, prompts, batch_size, max_new_tokens, returns_prompt=True, progress=progress)


def named_options(reply: str, choices: Sequence[str]) -> set[int]:
    """The indices of the options whose text a reply names (whole words, any case), the longest
    first, so that ``purple circle`` is not also counted as ``circle``."""
    text, found = reply.lower(), set()
    for i in sorted(range(len(choices)), key=lambda i: -len(choices[i])):
        pattern = re.compile(rf"(?<!\w){re.escape(choices[i].lower())}(?!\w)")
        if pattern.search(text):
            found.add(i)
            text = pattern.sub(" ", text)
    return found


def mc_records(problems: Sequence[Problem], replies: Sequence[str]) -> list[dict]:
    """One record per problem: its labels, the true letter, the reply, the letter read from it, and
    whether the reply's words name the right option and no other (``named``): a reasoning can name
    the answer and still give the wrong letter."""
    recs = []
    for p, r in zip(problems, replies):
        parsed = parse_answer(r, len(p.choices))
        recs.append(
            {
                "pid": p.pid,
                "category": p.category,
                "subject": p.subject,
                "image": bool(p.image),
                "choices": len(p.choices),
                "answer": p.letter,
                "reply": r,
                "parsed": parsed,
                "correct": parsed == p.letter,
                "named": named_options(r, p.choices) == {p.answer},
            }
        )
    return recs


def score_mc(recs: Sequence[dict]) -> dict:
    """Accuracy overall, per category, per subject and for questions with / without a picture,
    with each group's size, the number of unparseable replies (counted as wrong), what guessing a
    letter would score, overall and per category (``chance_by``), and the share of replies whose
    words name the right option and no other (``named``, whatever letter they give)."""

    def acc(rows):
        return sum(r["correct"] for r in rows) / len(rows)

    def groups(key):
        by = defaultdict(list)
        for r in recs:
            by[key(r)].append(r)
        return {k: acc(v) for k, v in sorted(by.items())}, {k: len(v) for k, v in sorted(by.items())}

    per_cat, n_cat = groups(lambda r: r["category"])
    per_subject, _ = groups(lambda r: r["subject"])
    per_image, n_image = groups(lambda r: "image" if r["image"] else "no image")
    return {
        "overall": acc(recs) if recs else 0.0,
        "chance": sum(1 / r["choices"] for r in recs) / len(recs) if recs else 0.0,  # guessing a letter
        "chance_by": {c: sum(1 / r["choices"] for r in recs if r["category"] == c) / n for c, n in n_cat.items()},
        "questions": len(recs),
        "unparseable": sum(r["parsed"] is None for r in recs),
        "named": sum(r["named"] for r in recs) / len(recs) if recs else 0.0,  # the right option's words, no other's
        "accuracy": per_cat,
        "count": n_cat,
        "subject": per_subject,
        "image": per_image,
        "image_count": n_image,
    }


def evaluate_mc(
    model, tokenizer, template: Template, problems: Sequence[Problem], features, **ask
) -> tuple[dict, list]:
    """Ask every problem (``ask``: :func:`mc_replies`' batch size, token budget, progress), read
    every reply: ``(score_mc summary, records)``."""
    recs = mc_records(problems, mc_replies(model, tokenizer, template, problems, features, **ask))
    return score_mc(recs), recs


def evaluate_mc_reader(lm, tokenizer, template: Template, problems: Sequence[Problem], contexts, **ask):
    """The text-only reader scored the same way (the paper's text-only row): ``(summary, records)``."""
    recs = mc_records(problems, reader_replies(lm, tokenizer, template, problems, contexts, **ask))
    return score_mc(recs), recs


def world_contexts(layout: Layout, splits: Sequence[str]) -> dict[str, SymbolicContext]:
    """The world's symbolic contexts by ``<split>/<file>``, the key a world problem names its picture by."""
    return {f"{s}/{c.file_name}": c for s in splits for c in load_contexts(layout.instances(s), layout.captions(s))}


# ------------------------------------------------------------------ what the commands run
def train_run(
    preset_name: str,
    answer_format: str,
    out: Path | None = None,
    data: Path | None = None,
    stage1: Path | None = None,
    lecture: bool = True,
    resume: bool = False,
    lora: bool | None = None,
    seed: int | None = None,
    **overrides,
) -> dict:
    """What ``llava-lite scienceqa train`` runs: stage 2 from the stage-1 checkpoint on the set's
    ``train`` split, answers in ``answer_format``; ``lora`` and ``seed`` as :func:`stages.train_stage`
    takes them, ``overrides`` replace the stage's settings (``max_steps``, ``lr``, ``batch_size``...)."""
    if answer_format not in FORMATS:
        raise ValueError(f"unknown answer format {answer_format!r}; expected one of {FORMATS}")
    preset, layout = get_preset(preset_name), Layout.for_preset(preset_name)
    data = Path(data) if data else layout.scienceqa
    check_world(data, layout)
    problems = read_split(data, "train")
    run1 = stages.run_dir(layout, 1, preset=preset)
    ckpt = stage1 or latest_checkpoint(run1)
    if ckpt is None:
        raise FileNotFoundError(f"no stage-1 checkpoint in {run1}: train stage 1 first")
    acc = make_accelerator(preset.stage2.precision)
    tower = stages.load_vision(preset.vision)
    with acc.main_process_first():
        feats = world_features(layout, tower, sorted({p.image_key.split("/")[0] for p in problems if p.image}))
    lm, tokenizer = stages.load_language(preset.language)
    model = stages.build_llava(preset, lm, tokenizer, tower, seed=seed)
    stages.prepare_stage2(preset, model, ckpt, lora, seed)
    if seed is not None:
        overrides["seed"] = seed
    out = out or layout.checkpoints / f"scienceqa-{answer_format}"
    samples = to_samples(problems, answer_format, lecture)
    return stages.run_stage(preset, model, tokenizer, feats, 2, samples, out, resume, accelerator=acc, **overrides)


def evaluate_run(
    preset_name: str,
    checkpoint: Path,
    data: Path | None = None,
    split: str = "test",
    images: Path | None = None,
    out: Path | None = None,
    reader: bool = False,
    max_new_tokens: int = 128,
) -> dict:
    """What ``llava-lite scienceqa evaluate`` runs: a trained model (or, with ``reader``, the
    language model reading the scene as text) on a split of the world set or of the official
    files (their pictures under ``images``); records and summary written to ``out``."""
    preset, layout = get_preset(preset_name), Layout.for_preset(preset_name)
    data = Path(data) if data else layout.scienceqa
    check_world(data, layout)
    problems = read_split(data, split)
    world_set = all(p.extra.get("world_image") for p in problems if p.image)
    if reader:
        lm, tokenizer = stages.load_language(preset.language)
        contexts = world_contexts(layout, sorted({p.image_key.split("/")[0] for p in problems if p.image}))
        template = get_template(preset.model.stage2_template, tokenizer)
        summary, recs = evaluate_mc_reader(lm, tokenizer, template, problems, contexts, max_new_tokens=max_new_tokens)
        name = "reader"
    else:
        tower = stages.load_vision(preset.vision)
        model, tokenizer = stages.load_stage(preset, checkpoint, tower)
        if world_set:
            feats = world_features(layout, tower, sorted({p.image_key.split("/")[0] for p in problems if p.image}))
        elif images is None and any(p.image for p in problems):
            raise ValueError(f"{data}: its problems have pictures; pass their folder (--images DIR/<split>/<pid>/...)")
        else:
            feats = image_features(tower, problems, images).__getitem__ if images else None
        template = get_template(preset.model.stage2_template, tokenizer)
        summary, recs = evaluate_mc(model, tokenizer, template, problems, feats, max_new_tokens=max_new_tokens)
        name = Path(checkpoint).name
    out = out or (Path(checkpoint) if checkpoint and not reader else data) / f"scienceqa_{split}_{name}.json"
    io.write_json(out, {"summary": summary, "records": recs}, indent=1)
    return summary
