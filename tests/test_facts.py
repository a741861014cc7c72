"""Facts that follow from names and boxes alone: which objects a sentence can single out."""

from llava_lite.facts import FACT_KINDS, Obj, checkable_kinds, unique_by

BOX = (0.1, 0.1, 0.2, 0.2)


def test_unique_by_keeps_the_objects_whose_name_no_other_object_shares_in_their_order():
    objs = [
        Obj("red circle", BOX),
        Obj("blue square", BOX),
        Obj("red circle", (0.5, 0.5, 0.7, 0.7)),
        Obj("green triangle", BOX),
    ]
    assert unique_by(objs) == [objs[1], objs[3]]
    assert unique_by(objs[:1]) == objs[:1] and unique_by([]) == []
    assert unique_by([objs[0], objs[2]]) == []  # two red circles: "the red circle" names neither


def test_unique_by_a_key_singles_out_by_that_attribute_only():
    objs = [Obj("red circle", BOX), Obj("red square", BOX), Obj("blue circle", BOX), Obj("green triangle", BOX)]
    assert unique_by(objs, key=lambda o: o.colour) == [objs[2], objs[3]]  # "the blue one", "the green one"
    assert unique_by(objs, key=lambda o: o.kind) == [objs[1], objs[3]]  # "the square", "the triangle"
    assert unique_by(objs) == objs  # every name differs


def test_a_photo_settles_existence_and_counts_only_and_the_world_every_kind_of_fact():
    photo = [Obj("person", (0.0, 0.0, 0.2, 0.9)), Obj("orange", (0.7, 0.1, 0.9, 0.3))]
    assert checkable_kinds(photo) == ("exist", "count") and checkable_kinds([]) == ("exist", "count")
    assert checkable_kinds([Obj("red circle", BOX)]) == FACT_KINDS
    assert FACT_KINDS == ("exist", "count", "colour", "shape", "position", "size")
