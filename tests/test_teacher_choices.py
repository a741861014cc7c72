"""The multiple-choice questions: every answer true of the scene's boxes, the wrong choices from
the same vocabulary and never the answer, and a hint offered only where its words suffice."""

import random

import pytest

from llava_lite import facts, world
from llava_lite.config import WorldConfig
from llava_lite.facts import COLOURS, RELATION_PHRASES, SHAPES
from llava_lite.teachers import choices
from llava_lite.teachers.questions import count_word

SCENES = [s.objects() for s in world.sample_world(WorldConfig(splits={"train": 150}, seed=4))["train"]]
PHRASE_RELATION = {v: k for k, v in RELATION_PHRASES.items()}


def _asked(category):
    out = []
    for i, objs in enumerate(SCENES):
        q = choices.MAKERS[category](objs, random.Random(i))
        if q:
            out.append((objs, q))
    return out


@pytest.mark.parametrize("category", choices.CATEGORIES)
def test_each_category_is_asked_of_many_scenes_and_never_offers_its_answer_as_a_wrong_choice(category):
    asked = _asked(category)
    assert len(asked) >= 30, category
    for _, q in asked:
        assert (
            q.category == category and q.answer not in q.distractors and len(set(q.distractors)) == len(q.distractors)
        )
        assert q.solution and 2 <= min(q.max_choices, 1 + len(q.distractors))


def test_count_answers_are_the_number_of_objects_of_the_kind_asked():
    for objs, q in _asked("count"):
        word = q.question.removeprefix("How many ").removesuffix(" are there?")
        n = sum(word in ("shapes", facts.plural(o.kind), f"{o.colour} shapes") for o in objs)
        assert q.answer == count_word(n) and set(q.distractors) <= {count_word(k) for k in range(7)}


def test_colour_shape_position_and_size_answers_follow_from_the_boxes():
    for objs, q in _asked("colour"):
        kind = q.question.removeprefix("Which colour is the ").removesuffix("?")
        assert [o.colour for o in objs if o.kind == kind] == [q.answer] and set(q.distractors) <= set(COLOURS)
    for objs, q in _asked("shape"):
        colour = q.question.removeprefix("What shape is the ").removesuffix(" object?")
        assert [o.kind for o in objs if o.colour == colour] == [q.answer] and set(q.distractors) <= set(SHAPES)
    for objs, q in _asked("position"):
        a, b = q.question.removeprefix("Where is the ").removesuffix("?").split(" compared with the ")
        (oa,), (ob,) = [o for o in objs if o.name == a], [o for o in objs if o.name == b]
        assert facts.holds(oa, PHRASE_RELATION[q.answer], ob)
    for objs, q in _asked("size"):
        largest = q.question.endswith("largest?")
        extreme = (max if largest else min)(objs, key=lambda o: o.area)
        assert q.answer == extreme.name and set(q.distractors) <= {o.name for o in objs}


def test_a_hint_is_offered_only_where_its_region_and_size_words_answer_the_question():
    for objs, q in _asked("position"):
        a, b = q.question.removeprefix("Where is the ").removesuffix("?").split(" compared with the ")
        (oa,), (ob,) = [o for o in objs if o.name == a], [o for o in objs if o.name == b]
        axis = facts.horizontal if q.answer in ("to the left of", "to the right of") else facts.vertical
        assert q.hint_ok == (axis(oa) != axis(ob)), (q, axis(oa), axis(ob))
    for objs, q in _asked("size"):
        (o,) = [x for x in objs if x.name == q.answer]
        assert q.hint_ok == (sum(x.size == o.size for x in objs) == 1)


def test_the_hint_names_every_object_with_its_size_and_region():
    objs = SCENES[0]
    hint = choices.scene_hint(objs)
    assert hint.startswith("A picture shows ") and hint.endswith(".")
    for o in objs:
        assert f"{o.size} {o.name} {facts.region_phrase(o)}" in hint
