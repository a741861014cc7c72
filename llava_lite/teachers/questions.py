"""Exact-answer questions: one short, checkable answer each, stated from the context alone.

They score stage 2 (``evaluate.py``) and, written as ``context -> question -> answer`` text on
the ``pretrain`` split, teach the tiny language model to read. Every answer follows from the
objects' names and boxes through :mod:`llava_lite.facts`.

Types: ``count``, ``colour``, ``shape``, ``position``, ``exist``, ``size``: all of them in the
shapes world; on a COCO context only ``count`` and ``exist``, the facts its names and boxes
settle (:func:`llava_lite.facts.checkable_kinds`, which the offline judge checks by too).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

from .. import facts
from ..facts import COLOURS, NUMBER_WORDS, SHAPES, Obj, unique_by

QTYPES = ("count", "colour", "shape", "position", "exist", "size")


@dataclass(frozen=True)
class ExactQA:
    qtype: str
    question: str
    answer: str


def _the(name: str) -> str:
    return f"the {name}"


def _count(objs: list[Obj], rng: random.Random) -> ExactQA | None:
    kinds = Counter(o.kind for o in objs)
    colours = Counter(o.colour for o in objs if o.colour)
    choices = [("shape", len(objs))]
    pool = sorted(set(kinds) | ({k for k in SHAPES} if colours else set()))
    choices += [(k, kinds.get(k, 0)) for k in pool]
    choices += [(f"{c} shape", n) for c, n in colours.items()]
    word, n = rng.choice(choices)
    if word == "shape" and not colours:
        word = "object"
    many = facts.plural(word)
    template = rng.choice(
        ["How many {} are there?", "How many {} can you see?", "How many {} are in the picture?", "Count the {}."]
    )
    return ExactQA("count", template.format(many), count_word(n))


def count_word(n: int) -> str:
    """A count as its exact answer: ``zero`` (never ``no``, which answers yes/no questions), ``one``..."""
    return "zero" if n == 0 else NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def _colour(objs, rng):
    cands = [o for o in unique_by(objs, lambda o: o.kind) if o.colour]
    if not cands:
        return None
    o = rng.choice(cands)
    t = rng.choice(
        [
            "What colour is the {}?",
            "What is the colour of the {}?",
            "Which colour does the {} have?",
            "The {} is what colour?",
        ]
    )
    return ExactQA("colour", t.format(o.kind), o.colour)


def _shape(objs, rng):
    cands = [o for o in unique_by(objs, lambda o: o.colour) if o.colour]
    if not cands:
        return None
    o = rng.choice(cands)
    t = rng.choice(
        [
            "What shape is the {} object?",
            "What is the shape of the {} object?",
            "Which shape is {}?",
            "The {} object is what shape?",
        ]
    )
    return ExactQA("shape", t.format(o.colour), o.kind)


def _position(objs, rng):
    named = unique_by(objs, lambda o: o.name)
    pairs = []
    for a in named:
        for b in named:
            if a is b:
                continue
            if facts.left_of(a, b) or facts.left_of(b, a):
                pairs.append((a, b, ("left", "right"), "left" if facts.left_of(a, b) else "right"))
            if facts.above(a, b) or facts.above(b, a):
                pairs.append((a, b, ("above", "below"), "above" if facts.above(a, b) else "below"))
    if not pairs:
        return None
    a, b, options, answer = rng.choice(pairs)
    x, y = options if rng.random() < 0.5 else options[::-1]
    if options[0] == "left":
        q = f"Is {_the(a.name)} to the {x} or to the {y} of {_the(b.name)}?"
    else:
        q = f"Is {_the(a.name)} {x} or {y} {_the(b.name)}?"
    return ExactQA("position", q, answer)


def _exist(objs, rng):
    present = sorted({o.name for o in objs})
    if rng.random() < 0.5:
        name, answer = rng.choice(present), "yes"
    else:
        if any(o.colour for o in objs):
            # absent categories that share a colour or a shape with something present are the hard ones
            near = [
                f"{c} {s}"
                for c in COLOURS
                for s in SHAPES
                if f"{c} {s}" not in present and any(o.colour == c or o.kind == s for o in objs)
            ]
            if not near:
                return None
            name = rng.choice(near)
        else:
            name = rng.choice(["dog", "umbrella", "bicycle", "pizza", "clock", "horse", "laptop", "boat"])
            if name in present:
                return None
        answer = "no"
    t = rng.choice(["Is there {} in the image?", "Can you see {}?", "Does the picture contain {}?", "Is there {}?"])
    return ExactQA("exist", t.format(facts.article(name)), answer)


def _size(objs, rng):
    named = unique_by(objs, lambda o: o.name)
    if not named:
        return None
    o = rng.choice(named)
    x, y = ("small", "large") if rng.random() < 0.5 else ("large", "small")
    return ExactQA("size", f"Is {_the(o.name)} {x} or {y}?", o.size)


MAKERS = {"count": _count, "colour": _colour, "shape": _shape, "position": _position, "exist": _exist, "size": _size}


def exact_question(objs: list[Obj], rng: random.Random, qtype: str | None = None) -> ExactQA | None:
    """One question of ``qtype`` (or of a random applicable type); ``None`` if none applies, or if
    the context cannot settle a fact of that type (a colour on a photo)."""
    if not objs:
        return None
    types = [qtype] if qtype else rng.sample(QTYPES, len(QTYPES))
    settled = facts.checkable_kinds(objs)
    for t in (t for t in types if t in settled):
        qa = MAKERS[t](objs, rng)
        if qa:
            return qa
    return None


def exact_questions(objs: list[Obj], rng: random.Random, n: int) -> list[ExactQA]:
    """Up to ``n`` different questions about one scene, types drawn evenly."""
    out: list[ExactQA] = []
    seen: set[str] = set()
    for _ in range(n * 4):
        qa = exact_question(objs, rng)
        if qa and qa.question not in seen:
            seen.add(qa.question)
            out.append(qa)
            if len(out) == n:
                break
    return out


_WORDS = {str(i): count_word(i) for i in range(len(NUMBER_WORDS))}


def normalise_answer(text: str) -> str:
    """The first word of a reply, lower-cased, digits as words: ``'Three.'`` -> ``'three'``."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    if not words:
        return ""
    return _WORDS.get(words[0], words[0])


def is_correct(reply: str, answer: str) -> bool:
    return normalise_answer(reply) == answer
