"""The symbolic teacher states only facts that follow from the context, in every response type."""

import random
import re
from collections import Counter

import pytest

from llava_lite import facts, io, world
from llava_lite.coco import SymbolicContext
from llava_lite.config import WorldConfig
from llava_lite.facts import COLOURS, NUMBER_WORDS, SHAPES, Obj
from llava_lite.paths import Layout
from llava_lite.teachers import instruct, symbolic

import kill_worker

NUM = "|".join(NUMBER_WORDS)
COL = "|".join(COLOURS)
REGIONS = r"in the centre|in the (?:top|bottom) (?:left|right) corner|on the left|on the right|at the top|at the bottom"
RELS = "|".join(facts.RELATION_PHRASES.values())
PHRASE_REL = {v: k for k, v in facts.RELATION_PHRASES.items()}


def _singular(word: str) -> str:
    for s, p in facts.PLURALS.items():
        if word == p:
            return s
    return word[:-1] if word.endswith("s") and word[:-1] in ("shape", "object", *SHAPES) else word


def _true_count(objs, noun: str) -> int:
    words = noun.split()
    if len(words) == 2 and words[0] in COLOURS:
        colour, what = words[0], _singular(words[1])
        return sum(o.colour == colour and (what in ("shape", "object") or o.kind == what) for o in objs)
    what = _singular(words[-1])
    return len(objs) if what in ("shape", "object") else sum(o.kind == what for o in objs)


def contradictions(text: str, objs: list[Obj]) -> tuple[list[str], int]:
    """Parse every count, colour, region, relation and size stated in ``text``; return the wrong ones."""
    low = text.lower()
    wrong, checked = [], 0
    named = Counter(o.name for o in objs)
    by_name = {o.name: o for o in objs if named[o.name] == 1}
    for m in re.finditer(rf"\bthere (?:is|are) ({NUM}) ((?:{COL}) [a-z]+|[a-z]+)", low):
        n = NUMBER_WORDS.index(m.group(1))
        checked += 1
        if _true_count(objs, m.group(2)) != n:
            wrong.append(m.group(0))
    for m in re.finditer(rf"\bthe ({'|'.join(SHAPES)}) is ({COL})\b", low):
        checked += 1
        kind = [o for o in objs if o.kind == m.group(1)]
        if len(kind) != 1 or kind[0].colour != m.group(2):
            wrong.append(m.group(0))
    for m in re.finditer(rf"\b(the|an?) ((?:{COL}) [a-z]+) is ({REGIONS})", low):
        checked += 1
        cands = (
            [by_name[m.group(2)]]
            if m.group(1) == "the" and m.group(2) in by_name
            else [o for o in objs if o.name == m.group(2)]
            if m.group(1) != "the"
            else []
        )
        if not any(facts.region_phrase(o) == m.group(3) for o in cands):
            wrong.append(m.group(0))
    for m in re.finditer(rf"\bthe ((?:{COL}) [a-z]+) is ({RELS}) the ((?:{COL}) [a-z]+)", low):
        checked += 1
        a, b = by_name.get(m.group(1)), by_name.get(m.group(3))
        if not (a and b and facts.holds(a, PHRASE_REL[m.group(2)], b)):
            wrong.append(m.group(0))
    for m in re.finditer(rf"\bthe ((?:{COL}) [a-z]+) is (?:(?:{REGIONS}) and )?(small|large)\b", low):
        checked += 1
        o = by_name.get(m.group(1))
        if not (o and o.size == m.group(2)):
            wrong.append(m.group(0))
    return wrong, checked


def _gpt_text(sample) -> str:
    return "\n".join(t["value"] for t in sample["conversations"] if t["from"] == "gpt")


def test_every_count_colour_and_position_stated_on_500_scenes_matches_the_annotations():
    scenes = world.sample_world(WorldConfig(splits={"test": 500}, seed=7))["test"]
    contexts = [SymbolicContext(s.image_id, s.file_name, s.size, s.size, ["a caption"], s.objects()) for s in scenes]
    samples, stats = symbolic.generate(contexts, kinds=("conversation", "detail", "complex"))
    objs = {c.file_name: c.objects for c in contexts}
    all_wrong, checked = [], Counter()
    for s in samples:
        wrong, n = contradictions(_gpt_text(s), objs[s["image"]])
        checked[s["type"]] += n
        all_wrong += [(s["id"], w) for w in wrong]
    assert not all_wrong, all_wrong[:10]
    # the parser really read facts out of every type (a parser that finds nothing proves nothing)
    assert checked["conversation"] > 1000 and checked["detail"] > 1500 and checked["complex"] > 300


def test_the_parser_catches_a_wrong_fact():
    objs = [Obj("red circle", (0.1, 0.1, 0.3, 0.3)), Obj("blue square", (0.6, 0.6, 0.9, 0.9))]
    assert contradictions(
        "There are two shapes. The circle is red. The red circle is to the left of the blue square.", objs
    ) == ([], 3)
    wrong, _ = contradictions(
        "There are three shapes. The circle is blue. The blue square is above the red circle. "
        "The red circle is in the centre. There is no blue square.",
        objs,
    )
    assert len(wrong) == 5


COCO_CONTEXTS = [
    SymbolicContext(
        1,
        "a.jpg",
        640,
        480,
        ["A man rides a horse on a beach.", "Two people near horses.", "x", "y", "z"],
        [
            Obj("person", (0.10, 0.20, 0.25, 0.80)),
            Obj("person", (0.60, 0.25, 0.70, 0.75)),
            Obj("horse", (0.05, 0.40, 0.45, 0.95)),
            Obj("dog", (0.80, 0.70, 0.95, 0.90)),
        ],
    ),
    SymbolicContext(
        2,
        "b.jpg",
        500,
        375,
        ["A kitchen with a fridge.", "b", "c", "d", "e"],
        [
            Obj("refrigerator", (0.70, 0.05, 0.98, 0.95)),
            Obj("oven", (0.30, 0.50, 0.55, 0.95)),
            Obj("bottle", (0.32, 0.30, 0.36, 0.45)),
        ]
        + [Obj("cup", (0.05 + 0.04 * i, 0.40, 0.08 + 0.04 * i, 0.46)) for i in range(6)],
    ),
    SymbolicContext(
        3,
        "c.jpg",
        640,
        427,
        ["A crowd at a stadium.", "b", "c", "d", "e"],
        [Obj("person", (0.03 * i, 0.5, 0.03 * i + 0.025, 0.7)) for i in range(14)]
        + [Obj("sports ball", (0.5, 0.2, 0.52, 0.23))],
    ),
]


@pytest.mark.parametrize("ctx", COCO_CONTEXTS, ids=["people-animals", "kitchen-many-boxes", "crowd"])
def test_real_coco_contexts_give_valid_samples_of_all_three_types(ctx):
    samples, _ = symbolic.generate([ctx], kinds=("conversation", "detail", "complex", "caption", "exact"))
    types = {s["type"] for s in samples}
    assert {"conversation", "detail", "complex"} <= types
    for s in samples:
        conv = s["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].count("<image>") == 1 and all("<image>" not in t["value"] for t in conv[1:])
        assert all(t["value"].strip() for t in conv)
        text = _gpt_text(s).lower()
        # never a colour or a shape-world word about objects that have none
        assert not re.search(rf"\b({COL})\b", text), text
    counts = re.findall(
        rf"there (?:is|are) ({NUM}) (people|persons?|cups?|horses?|objects?)",
        " ".join(_gpt_text(s) for s in samples).lower(),
    )
    truth = {
        "people": sum(o.kind == "person" for o in ctx.objects),
        "cup": sum(o.kind == "cup" for o in ctx.objects),
        "horse": sum(o.kind == "horse" for o in ctx.objects),
        "object": len(ctx.objects),
    }
    for n, noun in counts:
        key = "people" if noun.startswith("pe") else noun.rstrip("s")
        assert NUMBER_WORDS.index(n) == truth[key], (n, noun)


def test_no_two_samples_in_a_split_are_identical_and_ids_are_unique():
    scenes = world.sample_world(WorldConfig(splits={"train": 400}, max_objects=2))["train"]
    contexts = [SymbolicContext(s.image_id, s.file_name, s.size, s.size, ["c"], s.objects()) for s in scenes]
    samples, stats = symbolic.generate(contexts)
    keys = [str(s["conversations"]) for s in samples]
    assert len(keys) == len(set(keys))
    assert len({s["id"] for s in samples}) == len(samples)
    assert stats["conversation"] >= 390  # repeats are redrawn, not silently lost


def test_questions_vary_in_wording():
    scenes = world.sample_world(WorldConfig(splits={"train": 200}))["train"]
    contexts = [SymbolicContext(s.image_id, s.file_name, s.size, s.size, ["c"], s.objects()) for s in scenes]
    samples, _ = symbolic.generate(contexts, kinds=("conversation",))
    openings = Counter(
        " ".join(t["value"].replace("<image>", "").split()[:3])
        for s in samples
        for t in s["conversations"]
        if t["from"] == "human"
    )
    assert len(openings) >= 25


def test_caption_samples_use_a_brief_instruction_and_a_real_caption():
    ctx = COCO_CONTEXTS[0]
    s = symbolic.sample(ctx, "caption", random.Random(0))
    q = s["conversations"][0]["value"].replace("<image>", "").strip()
    assert q in symbolic.BRIEF_INSTRUCTIONS and len(symbolic.BRIEF_INSTRUCTIONS) >= 11
    assert s["conversations"][1]["value"] in ctx.captions


def test_instruction_data_is_rebuilt_when_the_world_is_redrawn(tmp_path):
    layout = Layout(tmp_path)
    world.generate(WorldConfig(splits={"val": 5}, seed=1), layout.world, progress=False)
    first = io.read_json(instruct.build_split(layout, "val"))
    world.generate(WorldConfig(splits={"val": 5}, seed=2), layout.world, progress=False)  # same ids, new scenes
    second = io.read_json(instruct.build_split(layout, "val"))
    assert [s["id"] for s in first] == [s["id"] for s in second] and first != second
    assert io.read_json(instruct.build_split(layout, "val")) == second  # unchanged world: kept as it is


@pytest.mark.parametrize("n", [1, 3])  # inside the samples' write; inside the stats' write
def test_instruction_data_killed_while_writing_is_rebuilt_byte_for_byte(small_world, tmp_path, n):
    straight, run = Layout(tmp_path / "straight"), Layout(tmp_path / "run")
    for layout in (straight, run):
        layout.root.mkdir()
        (layout.root / "world").symlink_to(small_world)
    instruct.build_split(straight, "val")
    kill = [{"call": "llava_lite.io:fsync_path", "n": n, "half": True}]
    assert kill_worker.kill_and_resume("instruct", {"root": str(run.root), "split": "val"}, kill, tmp_path) == [-9]
    assert kill_worker.temp_files(run.instruct)
    instruct.build_split(run, "val")
    assert kill_worker.temp_files(run.instruct) == []
    for name in ("val.json", "val.stats.json"):
        assert (run.instruct / name).read_bytes() == (straight.instruct / name).read_bytes()
