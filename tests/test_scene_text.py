"""The scene as text for a reading LM: every exact question is answered by lookups in the sized
table, each line lists every object in an order of its own, and the sorted lines are sorted."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from llava_lite.coco import load_contexts
from llava_lite.config import WorldConfig
from llava_lite.facts import COLOURS, SHAPES
from llava_lite.io import write_json
from llava_lite.scene_text import object_lines, reading_context, reading_layout, scene_table
from llava_lite.teachers.questions import QTYPES, count_word, exact_questions
from llava_lite.world import coco_files, sample_world

COLOUR_SHAPES = {f"{c} {s}" for c in COLOURS for s in SHAPES}
SIZED_LINES = ["objects", "colours", "sizes", "across", "down", "left to right", "top to bottom", "small to large"]


def _contexts(tmp_path, n: int, seed: int):
    """``n`` scenes of the shapes world, written as COCO files and read back like any split."""
    cfg = WorldConfig(splits={"scenes": n}, seed=seed)
    instances, captions = coco_files(sample_world(cfg)["scenes"], cfg, "scenes")
    write_json(tmp_path / "instances.json", instances)
    write_json(tmp_path / "captions.json", captions)
    return load_contexts(tmp_path / "instances.json", tmp_path / "captions.json")


def _rows(table: str) -> dict[str, list[str]]:
    return {k: v.split(", ") for k, v in (line.split(": ", 1) for line in table.split("\n"))}


def _read_table(table: str, qa) -> str:
    """Answer an exact question from a ``scene_table`` by lookups and one comparison only: what
    the tiny LM must learn to do."""
    rows = _rows(table)
    names = rows["objects"]  # always colour first
    words = re.findall(r"[a-z]+", qa.question.lower())
    named = [f"{a} {b}" for a, b in zip(words, words[1:]) if f"{a} {b}" in COLOUR_SHAPES]

    def value(key: str, name: str) -> str:
        """What line ``key`` says of ``name`` (its words in either order)."""
        return next(
            e.rsplit(" ", 1)[1] for e in rows[key] if sorted(e.rsplit(" ", 1)[0].split()) == sorted(name.split())
        )

    if qa.qtype == "colour":
        shape = next(w for w in words if w in SHAPES)
        return next(e.split()[1] for e in rows["colours"] if e.split()[0] == shape)
    if qa.qtype == "shape":
        colour = next(w for w in words if w in COLOURS)
        return next(e.split()[0] for e in rows["colours"] if e.split()[1] == colour)
    if qa.qtype == "size":
        return value("sizes", named[0])
    if qa.qtype == "exist":
        return "yes" if named[0] in names else "no"
    if qa.qtype == "position":
        a, b = named
        key, first, second = ("across", "left", "right") if "left" in words else ("down", "above", "below")
        va, vb = int(value(key, a)), int(value(key, b))
        assert va != vb, (table, qa)  # a position question is never a tie in tenths
        return first if va < vb else second
    plural = next(w for w in words if w in ("circles", "squares", "triangles", "shapes", "objects"))
    before = words[words.index(plural) - 1]
    colour, kind = (before if before in COLOURS else None), (plural[:-1] if plural[:-1] in SHAPES else None)
    n = sum(1 for x in names if colour in (None, x.split()[0]) and kind in (None, x.split()[1]))
    return count_word(n)


def test_scene_table_answers_every_exact_question_by_lookup(tmp_path):
    contexts = _contexts(tmp_path, 300, seed=3)
    rng, checked = random.Random(0), Counter()
    for ctx in contexts:
        table = reading_context(ctx, "sized")
        for qa in exact_questions(ctx.objects, rng, 8):
            assert _read_table(table, qa) == qa.answer, (table, qa)
            checked[qa.qtype] += 1
    assert set(checked) == set(QTYPES) and min(checked.values()) > 100, checked


def test_every_line_lists_every_object_in_an_order_of_its_own(tmp_path):
    contexts = _contexts(tmp_path, 120, seed=4)
    reordered, orders_differ = 0, 0
    for ctx in contexts:
        text = reading_context(ctx, "sized")
        assert text == reading_context(ctx, "sized")  # read again: the same text (seeded by the scene)
        rows = _rows(text)
        assert list(rows) == SIZED_LINES
        names = sorted(rows["objects"])
        assert names == sorted(o.name for o in ctx.objects)
        for key in SIZED_LINES[2:]:
            # "down" and its sorted line name shape first: "circle red 6"
            as_name = (
                (lambda e: " ".join(e.split()[:2][::-1]))
                if key in ("down", "top to bottom")
                else (lambda e: e.rsplit(" ", 1)[0])
            )
            assert sorted(as_name(e) for e in rows[key]) == names, (key, text)
        assert sorted(rows["colours"]) == sorted(f"{o.kind} {o.colour}" for o in ctx.objects)
        reordered += rows["sizes"] != [f"{o.name} {o.size}" for o in ctx.objects]
        # pretraining draws a new order each time it reads a scene
        orders_differ += len({scene_table(ctx, random.Random(i)) for i in range(20)}) > 1
    assert reordered > len(contexts) // 3 and orders_differ > len(contexts) // 2, (reordered, orders_differ)


def test_sorted_lines_list_each_coordinate_in_order_and_answer_position_by_order(tmp_path):
    contexts = _contexts(tmp_path, 200, seed=5)
    rng, by_order = random.Random(0), Counter()
    for i, ctx in enumerate(contexts):
        rows = _rows(reading_context(ctx, "sized", random.Random(i)))
        for key, axis in (("left to right", "across"), ("top to bottom", "down")):
            assert sorted(rows[key]) == sorted(rows[axis]), rows
            digits = [int(e.rsplit(" ", 1)[1]) for e in rows[key]]
            assert digits == sorted(digits), rows
        # a position question is answered by which of its two names the sorted line lists first
        for qa in exact_questions(ctx.objects, rng, 8):
            if qa.qtype != "position":
                continue
            words = re.findall(r"[a-z]+", qa.question.lower())
            a, b = [f"{x} {y}" for x, y in zip(words, words[1:]) if f"{x} {y}" in COLOUR_SHAPES]
            key, first, second = (
                ("left to right", "left", "right") if "left" in words else ("top to bottom", "above", "below")
            )
            names = [" ".join(sorted(e.rsplit(" ", 1)[0].split())) for e in rows[key]]
            ia, ib = names.index(" ".join(sorted(a.split()))), names.index(" ".join(sorted(b.split())))
            assert (first if ia < ib else second) == qa.answer, (rows, qa)
            by_order[qa.answer] += 1
    assert set(by_order) == {"left", "right", "above", "below"} and min(by_order.values()) > 20, by_order


def test_sized_layout_repeats_each_size_small_ones_first(tmp_path):
    contexts = _contexts(tmp_path, 200, seed=6)
    rng, asked, mixed = random.Random(0), Counter(), 0
    for i, ctx in enumerate(contexts):
        rows = _rows(reading_context(ctx, "sized", random.Random(i)))
        assert list(rows)[-1] == "small to large"
        assert sorted(rows["small to large"]) == sorted(rows["sizes"]), rows
        sizes = [e.rsplit(" ", 1)[1] for e in rows["small to large"]]
        assert sizes == sorted(sizes, key=lambda w: w == "large"), rows
        mixed += len(set(sizes)) == 2
        # a size question is answered by the word after its name in the small to large line
        for qa in exact_questions(ctx.objects, rng, 8):
            if qa.qtype == "size":
                name = re.search(r"Is the (\w+ \w+) ", qa.question).group(1)
                said = [e.rsplit(" ", 1)[1] for e in rows["small to large"] if e.rsplit(" ", 1)[0] == name]
                assert said == [qa.answer]
                asked[qa.answer] += 1
    assert mixed > 50 and min(asked[a] for a in ("small", "large")) > 20, (mixed, asked)


def test_reading_layouts_and_the_layout_a_tokenizer_records(tmp_path):
    ctx = _contexts(tmp_path, 3, seed=1)[0]
    assert reading_context(ctx, "boxes") == object_lines(ctx)
    assert object_lines(ctx).count("\n") == len(ctx.objects) - 1 and ": [" in object_lines(ctx)
    assert reading_context(ctx) == reading_context(ctx, "sized", random.Random(f"{ctx.image_id}:sized"))
    with pytest.raises(ValueError, match="unknown reading layout 'grid'"):
        reading_context(ctx, "grid")

    class Tok:  # what reading_layout reads from a tokenizer
        def __init__(self, **kw):
            self.init_kwargs = kw

    assert reading_layout(Tok(reading_layout="sized")) == "sized" and reading_layout(Tok()) == "boxes"
