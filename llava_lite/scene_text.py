"""A symbolic context written as text, for a language model that reads the scene instead of seeing it.

The paper's text-only row is GPT-4 answering from the captions and boxes alone. Ours is the tiny
LM reading the scene in the layout it was pretrained on, in the very place where LLaVA puts the
``<image>`` tokens. Two layouts:

- ``sized`` (the shipped tiny LM's): one line per kind of fact, every object named in each, the
  word a question names first and the fact it asks for second; each line lists the objects in
  its own order, and three lines repeat the coordinates and the sizes sorted::

      objects: red circle, blue square
      colours: square blue, circle red
      sizes: blue square small, red circle large
      across: red circle 2, blue square 7
      down: square blue 1, circle red 6
      left to right: red circle 2, blue square 7
      top to bottom: square blue 1, circle red 6
      small to large: blue square small, red circle large

  ``across``/``down`` are box centres in tenths of the image (0 = left/top edge, 9 = right/bottom).
  Every exact question is then "find the key, read what follows" (a position question one
  comparison of two digits): reading the table as text trains the very lookups the questions need.
- ``boxes``: the ``name: [x1, y1, x2, y2]`` lines of the context (what the paper's teacher read),
  for a language model that records no layout of its own (a hub model).

A tokenizer records the layout its model learned (``reading_layout`` in its
``tokenizer_config.json``), so every reader writes contexts the way the model learned them.
"""

from __future__ import annotations

import random

from .coco import SymbolicContext
from .facts import Obj

LAYOUTS = ("sized", "boxes")
SORTED_LINES = {"across": "left to right", "down": "top to bottom", "sizes": "small to large"}


def tenth(v: float) -> str:
    """A normalised coordinate as the table writes it: its tenth, ``0``..``9``."""
    return str(min(9, max(0, int(v * 10))))


def scene_table(ctx: SymbolicContext, rng: random.Random) -> str:
    """The ``sized`` layout of ``ctx``; ``rng`` orders each line (a new order every time a scene
    is read while pretraining, a fixed one from the scene's id otherwise). The ``down`` line
    names shape first (``circle red 6``), so a colour after a shape word is as predictable as a
    shape after a colour word. Categories without a colour (COCO) have no colour line."""
    objs = ctx.objects

    def listed() -> list[Obj]:
        return rng.sample(objs, len(objs))

    def entry(o: Obj, line: str) -> str:
        name = f"{o.kind} {o.colour}" if line == "down" and o.colour else o.name
        value = {"sizes": o.size, "across": tenth(o.cx), "down": tenth(o.cy)}[line]
        return f"{name} {value}"

    lines = ["objects: " + ", ".join(o.name for o in listed())]
    if any(o.colour for o in objs):
        lines.append("colours: " + ", ".join(f"{o.kind} {o.colour}" for o in listed() if o.colour))
    for line in ("sizes", "across", "down"):
        lines.append(f"{line}: " + ", ".join(entry(o, line) for o in listed()))
    for line, key in (("across", lambda o: o.cx), ("down", lambda o: o.cy)):
        lines.append(f"{SORTED_LINES[line]}: " + ", ".join(entry(o, line) for o in sorted(objs, key=key)))
    by_size = sorted(listed(), key=lambda o: o.size == "large")  # two values: ties keep a random order
    lines.append(f"{SORTED_LINES['sizes']}: " + ", ".join(entry(o, "sizes") for o in by_size))
    return "\n".join(lines)


def object_lines(ctx: SymbolicContext) -> str:
    """The ``name: [x1, y1, x2, y2]`` lines of ``ctx.text()`` (no captions), in the file's order."""
    text = ctx.text()
    lines = text.split("\n\n", 1)[1] if "\n\n" in text else ""
    if len(lines.split("\n")) != len(ctx.objects):
        raise ValueError(f"image {ctx.image_id}: expected {len(ctx.objects)} object lines, found {lines!r}")
    return lines


def reading_layout(tokenizer) -> str:
    """The layout a tokenizer's model was pretrained to read; ``boxes`` when it records none."""
    return tokenizer.init_kwargs.get("reading_layout", "boxes")


def reading_context(ctx: SymbolicContext, layout: str = "sized", rng: random.Random | None = None) -> str:
    """``ctx`` as text in ``layout``; ``sized`` lines are ordered by ``rng``, or by the scene's id
    when none is given (the same text every time)."""
    if layout == "sized":
        return scene_table(ctx, rng if rng is not None else random.Random(f"{ctx.image_id}:sized"))
    if layout == "boxes":
        return object_lines(ctx)
    raise ValueError(f"unknown reading layout {layout!r}; expected one of {LAYOUTS}")
