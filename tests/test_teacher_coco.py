"""The symbolic teacher on real COCO: all 80 category names (multi-word ones, ``orange`` the fruit,
``skis`` and ``scissors`` that look plural), crowd annotations and images with no instance give
grounded samples or a stated skip, never a crash."""

import random
import re
from collections import Counter

import pytest

from llava_lite import coco, facts, io, validate
from llava_lite.facts import COLOURS, NUMBER_WORDS
from llava_lite.judge import COCO_CATEGORIES
from llava_lite.teachers import questions, symbolic

N_IMAGES = 24


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    """A COCO-format split whose instances name every one of the 80 categories: four categories an
    image (one of them twice), a crowd annotation, and two images with no instance at all."""
    root = tmp_path_factory.mktemp("coco80")
    cats = [{"id": i + 1, "name": n, "supercategory": "x"} for i, n in enumerate(COCO_CATEGORIES)]
    images, anns, caps = [], [], []
    for i in range(N_IMAGES):
        images.append({"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": 640, "height": 480})
        caps += [{"id": 100 * i + c, "image_id": i + 1, "caption": f"A photo, number {i} ({c})."} for c in range(5)]
        if i >= 22:
            continue  # no instance annotated
        picked = [(4 * i + k) % 80 for k in range(4)] + [(4 * i) % 80]
        for k, c in enumerate(picked):
            x = 20 + 140 * (k % 4)
            box = [x, 40 + 100 * (k // 4), 100, 120]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c + 1, "bbox": box, "iscrowd": 0})
        if i % 5 == 0:
            crowd = {"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "bbox": [0, 300, 600, 170], "iscrowd": 1}
            anns.append(crowd)
    io.write_json(root / "instances.json", {"images": images, "annotations": anns, "categories": cats})
    io.write_json(root / "captions.json", {"images": images, "annotations": caps})
    return coco.load_contexts(root / "instances.json", root / "captions.json")


def _gpt(s) -> str:
    return "\n".join(t["value"] for t in s["conversations"] if t["from"] == "gpt")


def test_the_fixture_carries_all_80_names_crowds_and_empty_images(contexts):
    names = {o.name for c in contexts for o in c.objects}
    assert names == set(COCO_CATEGORIES) and len(names) == 80
    assert sum(not c.objects for c in contexts) == 2


def test_no_coco_name_reads_as_a_colour_and_plural_looking_names_count_in_pairs():
    assert facts.Obj("orange", (0, 0, 1, 1)).colour is None and facts.Obj("orange", (0, 0, 1, 1)).kind == "orange"
    assert all(facts.Obj(n, (0, 0, 1, 1)).colour is None for n in COCO_CATEGORIES)
    assert facts.Obj("red circle", (0, 0, 1, 1)).colour == "red"
    assert [facts.count_phrase(n, "skis") for n in (1, 2)] == ["one pair of skis", "two pairs of skis"]
    assert facts.article("scissors") == "a pair of scissors" and facts.article("orange") == "an orange"
    got = [facts.plural(w) for w in ("person", "sheep", "mouse", "knife", "wine glass", "bus", "hair drier")]
    assert got == ["people", "sheep", "mice", "knives", "wine glasses", "buses", "hair driers"]


def test_every_context_gives_valid_samples_or_a_stated_skip_of_every_type(contexts, tmp_path):
    samples, stats = symbolic.generate(contexts, symbolic.TYPES)
    for kind in symbolic.TYPES:  # each context accounted for: a sample, or a skip that says why
        accounted = stats.get(kind, 0) + stats.get(f"{kind}: not applicable", 0)
        accounted += stats.get(f"{kind}: left out as a repeat", 0)
        assert accounted == N_IMAGES, (kind, stats)
    assert stats["conversation"] == stats["detail"] == stats["caption"] == N_IMAGES
    assert stats["exact: not applicable"] == 2  # the two images without an instance: nothing to ask
    io.write_json(tmp_path / "coco.json", samples)
    assert validate.validate_file(tmp_path / "coco.json").ok
    # an image without instances is described by its captions only, nothing invented about objects
    empty = {c.file_name: c for c in contexts if not c.objects}
    for s in samples:
        if s["image"] in empty and s["type"] == "conversation":
            assert _gpt(s) == empty[s["image"]].captions[0]
        if s["image"] in empty and s["type"] == "detail":
            assert _gpt(s) == " ".join(empty[s["image"]].captions[:2])


def test_every_count_stated_about_a_coco_category_matches_its_instances(contexts):
    samples, _ = symbolic.generate(contexts, ("conversation", "detail", "complex"))
    by_image = {c.file_name: Counter(o.name for o in c.objects) for c in contexts}
    nouns = {facts.plural(n): n for n in COCO_CATEGORIES} | {n: n for n in COCO_CATEGORIES}
    nouns |= {f"pair of {n}": n for n in facts.PAIRS}
    pattern = "|".join(sorted(map(re.escape, nouns), key=len, reverse=True))
    checked = 0
    for s in samples:
        for m in re.finditer(rf"\bthere (?:is|are) ({'|'.join(NUMBER_WORDS)}) ({pattern})\b", _gpt(s).lower()):
            checked += 1
            assert NUMBER_WORDS.index(m.group(1)) == by_image[s["image"]][nouns[m.group(2)]], (s["id"], m.group(0))
        # a colour is never claimed for a COCO object ("the orange is orange" would be made up)
        assert not re.search(rf"\bis ({'|'.join(COLOURS)})\b", _gpt(s).lower()), (s["id"], _gpt(s))
    assert checked >= 40
    said = " ".join(_gpt(s).lower() for s in samples)
    assert all(re.search(rf"\b{re.escape(n)}", said) for n in COCO_CATEGORIES)


def test_exact_questions_on_coco_ask_only_what_its_names_and_boxes_settle(contexts):
    rng = random.Random(0)
    asked = Counter(qa.qtype for c in contexts for qa in questions.exact_questions(c.objects, rng, 4))
    assert set(asked) == {"count", "exist"} and min(asked.values()) >= 10, asked
    # two objects clearly apart, one box a quarter of the image: still no position or size question
    apart = [facts.Obj("person", (0.0, 0.1, 0.25, 0.9)), facts.Obj("dog", (0.7, 0.5, 0.9, 0.7))]
    assert questions.MAKERS["position"](apart, rng) is not None  # the world's maker would ask one
    assert [questions.exact_question(apart, rng, t) for t in ("position", "size", "colour")] == [None] * 3
    world = [facts.Obj("red circle", (0.0, 0.1, 0.25, 0.9)), facts.Obj("blue square", (0.7, 0.5, 0.9, 0.7))]
    assert questions.exact_question(world, rng, "position").answer in ("left", "right")
