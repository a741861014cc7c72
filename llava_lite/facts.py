"""Facts about objects that follow from a symbolic context alone (a name and a box).

Both the world's captions and the symbolic teacher state facts through these functions, so
every relation, region and size word in the data means the same thing everywhere, and a test
can parse a sentence back and check it against the boxes.

Boxes are ``(x1, y1, x2, y2)`` normalised to 0..1, origin top-left.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
SHAPES = ("circle", "square", "triangle")
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "person": "people",
    "sheep": "sheep",
    "mouse": "mice",
    "knife": "knives",
    "broccoli": "broccoli",
}
# names that are plural already (COCO's ``skis``, ``scissors``): one object is a pair of them
PAIRS = ("skis", "scissors")
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# a relation is stated only when it is clear: the centres differ by at least this much
RELATION_MARGIN = 0.12
# two boxes are "next to" each other when the gap between them is at most this
NEXT_TO_GAP = 0.08
# the world's size classes are split by box side (as a fraction of the image side)
LARGE_SIDE = 0.22
# the kinds of fact a context can settle (what exact questions ask and the offline judge checks)
FACT_KINDS = ("exist", "count", "colour", "shape", "position", "size")


@dataclass(frozen=True)
class Obj:
    """One object of a symbolic context: its category name and normalised box."""

    name: str
    box: tuple[float, float, float, float]

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2

    @property
    def cy(self) -> float:
        return (self.box[1] + self.box[3]) / 2

    @property
    def w(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def h(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return self.w * self.h

    @property
    def colour(self) -> str | None:
        """The colour of a shapes-world category (``red circle`` -> ``red``); ``None`` for any other
        name, COCO's ``orange`` (the fruit) among them."""
        words = self.name.split()
        return words[0] if len(words) == 2 and words[0] in COLOURS and words[1] in SHAPES else None

    @property
    def kind(self) -> str:
        """The category without its colour (``red circle`` -> ``circle``; ``person`` -> ``person``)."""
        return self.name.split(" ", 1)[1] if self.colour else self.name

    @property
    def size(self) -> str:
        return "large" if max(self.w, self.h) >= LARGE_SIDE else "small"


def checkable_kinds(objs: list[Obj]) -> tuple[str, ...]:
    """The kinds of fact a context's names and boxes settle, so the teacher asks and the judge
    checks the same ones: all of :data:`FACT_KINDS` in the shapes world; on a photo (names without
    a colour, COCO's) only existence and counts, since its names carry no colour or shape and its
    boxes are not the world's (no size classes, no object placed whole in one region)."""
    return FACT_KINDS if any(o.colour for o in objs) else ("exist", "count")


def unique_by(objs: list[Obj], key=lambda o: o.name) -> list[Obj]:
    """The objects whose ``key`` (default: the name) no other object shares: the only ones a
    sentence or a question can call "the <key>"."""
    c = Counter(key(o) for o in objs)
    return [o for o in objs if c[key(o)] == 1]


def plural(word: str) -> str:
    """``circle`` -> ``circles``, ``wine glass`` -> ``wine glasses``, ``skis`` -> ``pairs of skis``."""
    if word in PAIRS:
        return f"pairs of {word}"
    if word in PLURALS:
        return PLURALS[word]
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def count_phrase(n: int, word: str) -> str:
    """``2, circle`` -> ``two circles``; ``1, circle`` -> ``one circle``."""
    number = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
    return f"{number} {_one(word) if n == 1 else plural(word)}"


def _one(word: str) -> str:
    return f"pair of {word}" if word in PAIRS else word


def article(phrase: str) -> str:
    phrase = _one(phrase)
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def horizontal(o: Obj) -> str:
    return "left" if o.cx < 1 / 3 else "right" if o.cx > 2 / 3 else "middle"


def vertical(o: Obj) -> str:
    return "top" if o.cy < 1 / 3 else "bottom" if o.cy > 2 / 3 else "middle"


def region(o: Obj) -> str:
    """Where in the picture: ``top left``, ``bottom``, ``left``, ``centre``..."""
    v, h = vertical(o), horizontal(o)
    if v == "middle" and h == "middle":
        return "centre"
    if v == "middle":
        return h
    if h == "middle":
        return v
    return f"{v} {h}"


def region_phrase(o: Obj) -> str:
    r = region(o)
    if r == "centre":
        return "in the centre"
    if " " in r:
        return f"in the {r} corner"
    if r in ("left", "right"):
        return f"on the {r}"
    return f"at the {r}"


# how a relation reads in a sentence
RELATION_PHRASES = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
    "next to": "next to",
}


def left_of(a: Obj, b: Obj) -> bool:
    """``a`` lies wholly to the left of ``b`` and their centres are clearly apart."""
    return a.box[2] <= b.box[0] and a.cx <= b.cx - RELATION_MARGIN


def above(a: Obj, b: Obj) -> bool:
    """``a`` lies wholly above ``b`` and their centres are clearly apart."""
    return a.box[3] <= b.box[1] and a.cy <= b.cy - RELATION_MARGIN


def gap(a: Obj, b: Obj) -> float:
    """Distance between the two boxes (0 when they touch or overlap)."""
    dx = max(b.box[0] - a.box[2], a.box[0] - b.box[2], 0.0)
    dy = max(b.box[1] - a.box[3], a.box[1] - b.box[3], 0.0)
    return (dx * dx + dy * dy) ** 0.5


def next_to(a: Obj, b: Obj) -> bool:
    return gap(a, b) <= NEXT_TO_GAP


def relation(a: Obj, b: Obj) -> str | None:
    """The clearest relation of ``a`` to ``b``: ``left of``, ``right of``, ``above``, ``below``."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dx) >= abs(dy):
        if left_of(a, b):
            return "left of"
        if left_of(b, a):
            return "right of"
    else:
        if above(a, b):
            return "above"
        if above(b, a):
            return "below"
    return None


def holds(a: Obj, rel: str, b: Obj) -> bool:
    """Does ``a <rel> b`` hold? The inverse of :func:`relation`, used to check stated facts."""
    return {
        "left of": lambda: left_of(a, b),
        "right of": lambda: left_of(b, a),
        "above": lambda: above(a, b),
        "below": lambda: above(b, a),
        "next to": lambda: next_to(a, b),
    }[rel]()
