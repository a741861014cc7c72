"""Multiple-choice questions about a scene, each with its lecture and a solution worked out from
the scene's facts: the questions of the world's ScienceQA-style set (:mod:`llava_lite.scienceqa`).

Every question needs the picture (or the hint that describes it): ``count``, ``colour``,
``shape``, ``position``, ``size``. The wrong choices come from the same vocabulary as the right
one (other colours, counts, shapes or relations; the scene's other objects). A question says
whether the text-only hint (:func:`scene_hint`) would suffice to answer it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from ..facts import (
    COLOURS,
    RELATION_PHRASES,
    SHAPES,
    Obj,
    article,
    count_phrase,
    horizontal,
    plural,
    region_phrase,
    unique_by,
    vertical,
)
from ..facts import relation as relation_of
from .questions import count_word

CATEGORIES = ("count", "colour", "shape", "position", "size")
SUBJECTS = {"count": "number", "colour": "appearance", "shape": "appearance", "position": "space", "size": "comparison"}
GRADES = {"count": "grade2", "colour": "grade1", "shape": "grade1", "position": "grade3", "size": "grade3"}
SKILLS = {
    "count": "Count the objects of one kind",
    "colour": "Name the colour of a shape",
    "shape": "Name the shape of an object",
    "position": "Tell where one object lies from another",
    "size": "Find the largest or smallest object",
}
LECTURES = {
    "count": "To count objects, find every object of the kind the question names and count each one once.",
    "colour": "A shape's colour is the colour that fills it. Find the one shape of the kind named and see its fill.",
    "shape": "A circle is round, a square has four equal sides and a triangle has three sides.",
    "position": "Left and right are read as the viewer sees the picture; up is the top of the picture.",
    "size": "To compare sizes, compare how much of the picture each shape covers.",
}


@dataclass
class MCQuestion:
    category: str
    question: str
    answer: str
    distractors: list[str]  # the vocabulary the other choices come from
    max_choices: int
    solution: str
    hint_ok: bool  # the text-only hint (names, sizes, regions) suffices to answer it


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _count(objs: list[Obj], rng: random.Random) -> MCQuestion:
    words = ["shape", *SHAPES, *(f"{c} shape" for c in sorted({o.colour for o in objs}, key=COLOURS.index))]
    word = rng.choice(words)
    match = [o for o in objs if word in ("shape", o.kind, f"{o.colour} shape")]
    n = len(match)
    if n == 0:
        solution = f"There is no {word} in the picture."
    else:
        solution = f"The picture has {count_phrase(n, word)}: {_join([article(o.name) for o in match])}."
    # any other count, not the nearest ones: those would put the true count in the middle of the choices
    others = rng.sample([k for k in range(7) if k != n], 6)
    return MCQuestion(
        "count",
        f"How many {plural(word)} are there?",
        count_word(n),
        [count_word(k) for k in others],
        5,
        solution,
        True,
    )


def _colour(objs, rng):
    cands = [o for o in unique_by(objs, lambda o: o.kind) if o.colour]
    if not cands:
        return None
    o = rng.choice(cands)
    solution = f"There is one {o.kind} in the picture, {region_phrase(o)}, and it is {o.colour}."
    pool = rng.sample([c for c in COLOURS if c != o.colour], len(COLOURS) - 1)
    return MCQuestion("colour", f"Which colour is the {o.kind}?", o.colour, pool, 5, solution, True)


def _shape(objs, rng):
    cands = [o for o in unique_by(objs, lambda o: o.colour) if o.colour]
    if not cands:
        return None
    o = rng.choice(cands)
    solution = f"The only {o.colour} object in the picture is {article(o.name)}, so it is {article(o.kind)}."
    pool = rng.sample([s for s in SHAPES if s != o.kind], len(SHAPES) - 1)
    return MCQuestion("shape", f"What shape is the {o.colour} object?", o.kind, pool, 3, solution, True)


def _regions_say(a: Obj, b: Obj, rel: str) -> bool:
    """Do the hint's region words alone show ``a <rel> b`` (``a`` left, ``b`` middle or right...)?"""
    if rel in ("left of", "right of"):
        order, x, y = ("left", "middle", "right"), horizontal(a), horizontal(b)
    else:
        order, x, y = ("top", "middle", "bottom"), vertical(a), vertical(b)
    return order.index(x) < order.index(y) if rel in ("left of", "above") else order.index(x) > order.index(y)


def _position(objs, rng):
    named = unique_by(objs)
    pairs = [(a, b, relation_of(a, b)) for a in named for b in named if a is not b]
    pairs = [p for p in pairs if p[2]]
    if not pairs:
        return None
    a, b, rel = rng.choice(pairs)
    phrase = RELATION_PHRASES[rel]
    where_a, where_b = region_phrase(a), region_phrase(b)
    solution = f"The {a.name} lies wholly {phrase} the {b.name}."
    if where_a != where_b:
        solution = f"The {a.name} is {where_a} and the {b.name} is {where_b}. " + solution
    pool = rng.sample([RELATION_PHRASES[r] for r in ("left of", "right of", "above", "below") if r != rel], 3)
    question = f"Where is the {a.name} compared with the {b.name}?"
    return MCQuestion("position", question, phrase, pool, 4, solution, _regions_say(a, b, rel))


def _size(objs, rng):
    if len(objs) < 2:
        return None
    by_area = sorted(objs, key=lambda o: o.area)
    named = unique_by(objs)
    options = []
    if by_area[-1].area >= 1.7 * by_area[-2].area and by_area[-1] in named:
        options.append(("largest", by_area[-1], "more"))
    if by_area[1].area >= 1.7 * by_area[0].area and by_area[0] in named:
        options.append(("smallest", by_area[0], "less"))
    others = [x.name for x in named]
    if not options or len(others) < 2:
        return None
    word, o, more = rng.choice(options)
    others.remove(o.name)
    solution = f"The {o.name} is {o.size} and covers {more} of the picture than any other shape, so it is the {word}."
    alone = sum(x.size == o.size for x in objs) == 1  # the hint's size words single it out
    return MCQuestion(
        "size", f"Which shape is the {word}?", o.name, rng.sample(others, len(others)), 5, solution, alone
    )


MAKERS = {"count": _count, "colour": _colour, "shape": _shape, "position": _position, "size": _size}


def scene_hint(objs: list[Obj]) -> str:
    """The picture in words (name, size, region of each object): the hint of a text-only question."""
    return "A picture shows " + _join([f"{article(o.size + ' ' + o.name)} {region_phrase(o)}" for o in objs]) + "."


def questions(objs: list[Obj], rng: random.Random, order: Sequence[str], n: int) -> list[MCQuestion]:
    """Up to ``n`` questions about one scene, of different categories, tried in ``order``."""
    made = (MAKERS[c](objs, rng) for c in order)
    return [q for q in made if q][:n]
