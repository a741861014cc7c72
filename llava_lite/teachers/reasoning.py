"""Complex reasoning, the paper's third response type: a question that takes several steps
(counting and comparing, removing, finding the leftmost, relating the largest to the smallest,
sorting into halves), answered step by step. The symbolic teacher writes each answer from the
boxes alone, every fact in one of :mod:`llava_lite.teachers.sentences`' forms."""

from __future__ import annotations

import random
from collections import Counter

from .. import facts
from ..coco import SymbolicContext
from ..facts import count_phrase, plural, unique_by
from .sentences import cap, counted, is_at, is_rel, listing, the, there_are


def _cx_more(objs, rng):
    kinds = counted(objs)
    pool = sorted(set(kinds) | ({"circle", "square", "triangle"} if objs[0].colour else set()))
    if len(pool) < 2:
        return None
    a, b = rng.sample(pool, 2)
    na, nb = kinds.get(a, 0), kinds.get(b, 0)
    q = f"Are there more {plural(a)} than {plural(b)} in the image?"
    verdict = "yes" if na > nb else "no"
    cmp = "more than" if na > nb else "the same as" if na == nb else "fewer than"
    steps = (
        f"First I count the {plural(a)}: {there_are(na, a)}. Then the {plural(b)}: {there_are(nb, b)}. "
        f"{cap(count_phrase(na, a))} is {cmp} {count_phrase(nb, b)}, so the answer is {verdict}."
    )
    return q, steps


def _cx_remove(objs, rng):
    colours = Counter(o.colour for o in objs if o.colour)
    if not colours:
        kinds = counted(objs)
        kind = rng.choice(sorted(kinds))
        n, k = len(objs), kinds[kind]
        q = f"If every {kind} left the picture, how many objects would remain?"
        return q, (
            f"Altogether {there_are(n, 'object')}. Of these, {there_are(k, kind)}. "
            f"Taking away {k} of {n} leaves {count_phrase(n - k, 'object')}."
        )
    colour = rng.choice(sorted(colours))
    n, k = len(objs), colours[colour]
    q = f"If all the {colour} shapes were removed, how many shapes would be left?"
    return q, (
        f"Altogether {there_are(n, 'shape')}. Of these, {there_are(k, colour + ' shape')}. "
        f"Removing {k} of {n} leaves {count_phrase(n - k, 'shape')}."
    )


def _cx_leftmost(objs, rng):
    if len(objs) < 2:
        return None
    side = rng.choice(["left", "right"])
    ordered = sorted(objs, key=lambda o: o.cx, reverse=(side == "right"))
    first, second = ordered[0], ordered[1]
    if abs(first.cx - second.cx) < 0.05 or first.name not in {o.name for o in unique_by(objs)}:
        return None
    q = f"Which object is furthest to the {side}, and what is it next to?"
    steps = [
        f"Comparing the horizontal positions of all {len(objs)} objects, {the(first)} is furthest to the {side}; "
        f"{is_at(first)}."
    ]
    near = [o for o in unique_by(objs) if o is not first and facts.next_to(first, o)]
    if near:
        steps.append(f"Checking the gaps between boxes, {the(first)} is next to {the(near[0])}.")
    else:
        steps.append("Checking the gaps between boxes, nothing is close to it, so it stands on its own.")
    return q, " ".join(steps)


def _cx_big_small(objs, rng):
    u = unique_by(objs)
    if len(u) < 2:
        return None
    big, small = max(u, key=lambda o: o.area), min(u, key=lambda o: o.area)
    if big.area < 1.5 * small.area:
        return None
    rel = facts.relation(big, small)
    if not rel:
        return None
    q = "Where is the largest object compared with the smallest one?"
    return q, (
        f"First I find the largest object by the size of its box: it is {the(big)}. "
        f"The smallest is {the(small)}. Comparing their positions, {is_rel(big, rel, small)}."
    )


def _cx_half(objs, rng):
    axis, side = rng.choice([("x", "left"), ("x", "right"), ("y", "top"), ("y", "bottom")])
    noun = "shape" if objs[0].colour else "object"
    centre = (lambda o: o.cx) if axis == "x" else (lambda o: o.cy)
    inside = [o for o in objs if (centre(o) < 0.5) == (side in ("left", "top"))]
    q = f"How many {plural(noun)} have their centre in the {side} half of the image, and which are they?"
    steps = f"I look at the centre of each of the {len(objs)} boxes and keep those in the {side} half. "
    if not inside:
        return q, steps + "None of them is there, so the answer is zero."
    return q, steps + f"That leaves {listing(inside)}, so {count_phrase(len(inside), noun)} in all."


COMPLEX = (_cx_more, _cx_remove, _cx_leftmost, _cx_big_small, _cx_half)


def complex_reasoning(ctx: SymbolicContext, rng: random.Random) -> tuple[str, str] | None:
    if not ctx.objects:
        return None
    for make in rng.sample(COMPLEX, len(COMPLEX)):
        qa = make(ctx.objects, rng)
        if qa:
            return qa
    return None


# ----------------------------------------------------------------- samples
