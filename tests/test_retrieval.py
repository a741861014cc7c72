"""Image-text retrieval: the trimmed text encoding, the recall protocols, the truth reader, and the
held-out descriptions."""

from __future__ import annotations

import random

import open_clip
import pytest
import torch

from llava_lite.facts import Obj
from llava_lite.retrieval import (
    caption_truth_oracle,
    encode_text,
    heldout_descriptions,
    object_description,
    retrieval_recall,
    scene_recall,
    shared_caption,
)


def test_description_names_every_object():
    objs = [
        Obj("red circle", (0.1, 0.1, 0.2, 0.2)),
        Obj("blue square", (0.5, 0.5, 0.9, 0.9)),
        Obj("green triangle", (0.7, 0.1, 0.8, 0.2)),
    ]
    for seed in range(20):
        text = object_description(objs, random.Random(seed))
        assert all(o.name in text for o in objs), text
        shapes = object_description(objs, random.Random(seed), colours=False)
        assert all(o.kind in shapes and o.colour not in shapes for o in objs), shapes


def test_trimmed_text_encoding_equals_open_clip_full_length():
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg={"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        text_cfg={
            "context_length": 12,
            "vocab_size": 20,
            "width": 32,
            "heads": 2,
            "layers": 2,
            "pool_type": "eos",
            "eos_id": 2,
            "pad_id": 0,
        },
    ).eval()
    ids = torch.randint(3, 20, (3, 12))
    ids[0, 4:], ids[0, 4] = 0, 2
    ids[1, 7:], ids[1, 7] = 0, 2
    ids[2, 2:], ids[2, 2] = 0, 2
    torch.testing.assert_close(encode_text(model, ids), model.encode_text(ids, normalize=True))


def test_retrieval_recall_counts_rank_of_own_caption():
    img = torch.eye(100)
    caps = torch.eye(100).unsqueeze(1).repeat(1, 2, 1)  # [100, 2, 100]: perfect captions
    assert retrieval_recall(img, caps)["r@1"] == 1.0
    caps[:, 1] = torch.roll(torch.eye(100), 1, 0)  # round 2: caption i describes image i-1 (and i+1's fits i)
    r = retrieval_recall(img, caps)
    assert r["r@1"] == 0.5 and r["r@5"] == 1.0 and r["n"] == 200


def test_scene_recall_counts_any_own_caption_or_the_same_string():
    img = torch.eye(100)
    caps = torch.zeros(100, 2, 100)
    caps[:, 1] = torch.eye(100)  # each image matches only its own second caption
    texts = [[f"vague {i}", f"telling {i}"] for i in range(100)]
    assert scene_recall(img, caps, texts) == {"r@1": 1.0, "r@5": 1.0, "n": 100}
    caps[:, 1] = torch.roll(torch.eye(100), 1, 0)  # image i now matches scene i+1's caption best
    assert scene_recall(img, caps, texts)["r@1"] == 0.0
    alike = [[f"vague {i}", "A picture of two objects."] for i in range(100)]  # the same string: a hit
    assert scene_recall(img, caps, alike)["r@1"] == 1.0
    with pytest.raises(ValueError, match="100 lists of 2 captions"):
        scene_recall(img, caps, texts[:99])


def test_caption_truth_oracle_finds_captions_that_fit_several_scenes():
    a = [Obj("red circle", (0.1, 0.1, 0.3, 0.3)), Obj("blue square", (0.6, 0.6, 0.9, 0.9))]
    b = [
        Obj("red circle", (0.1, 0.1, 0.3, 0.3)),
        Obj("blue square", (0.6, 0.6, 0.9, 0.9)),
        Obj("green triangle", (0.6, 0.1, 0.9, 0.3)),
    ]
    objects = [a, b] * 50
    # every scene captioned "red circle and blue square" (true of a and of b: the terse caption
    # names three objects at most), or "A picture of three objects." (true of b only)
    caps = [
        ["red circle and blue square", "A picture of two objects."]
        if i % 2 == 0
        else ["red circle and blue square and green triangle", "A picture of three objects."]
        for i in range(100)
    ]
    o = caption_truth_oracle(objects, caps, draws=50)
    assert o["coverage"] == 1.0 and o["n"] == 200
    # round 1: "red circle and blue square and green triangle" is not true of a; round 2 is unambiguous
    assert o["r@1"] == 1.0 and o["no_true_rival"] == 1.0
    caps = [
        ["red circle and blue square", "A picture of two objects."]
        if i % 2 == 0
        else ["Circles, squares and triangles, every kind of shape.", "A picture of three objects."]
        for i in range(100)
    ]
    # scene b's round-1 rival "red circle and blue square" is not true of b (it has three objects and
    # the terse caption lists them all); a's rival is not true of a: still unambiguous
    assert caption_truth_oracle(objects, caps, draws=50)["r@1"] == 1.0
    caps = [
        ["red circle and blue square", "A picture of two objects."]
        if i % 2 == 0
        else ["A red circle and a blue square.", "A picture of three objects."]
        for i in range(100)
    ]
    o = caption_truth_oracle(objects, caps, draws=300)
    # "A red circle and a blue square." (an enumeration) is true of a, so each of a's round-1 queries
    # has a true rival: half the round-1 queries score 1/2
    assert o["r@1"] == pytest.approx((50 * 0.5 + 50 + 100) / 200) and o["no_true_rival"] == 0.75


def test_shared_caption_finds_a_caption_true_of_another_scene():
    a = [Obj("red circle", (0.1, 0.1, 0.3, 0.3)), Obj("blue square", (0.6, 0.6, 0.9, 0.9))]
    b = [Obj("green triangle", (0.6, 0.1, 0.9, 0.3))]
    caps = [["red circle and blue square", "A picture of two objects."], ["green triangle", "A lone green triangle."]]
    assert shared_caption([a, b, b], caps + [caps[1]], i=1) == (0, 2)  # scene 2 has the same objects as scene 1
    assert shared_caption([a, b], caps, i=0) is None


def test_heldout_descriptions_name_every_object_and_are_seeded():
    objects = [[Obj("red circle", (0.1, 0.1, 0.2, 0.2)), Obj("blue square", (0.5, 0.5, 0.9, 0.9))]] * 3
    d = heldout_descriptions(objects, "x")
    assert d == heldout_descriptions(objects, "x") and all("red circle" in t and "blue square" in t for t in d)
