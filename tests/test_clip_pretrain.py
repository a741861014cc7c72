"""Tiny CLIP pretraining at smoke size: it trains, saves in open_clip's format, and the pieces
it relies on (descriptions, trimmed text encoding, the retrieval metric) do what they say."""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, replace

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from llava_lite import world
from llava_lite.clip_pretrain import (ClipTrainConfig, build_model, caption_truth_oracle, contrastive_loss,
                                      counterfactual, describe, description_pair, encode_text, heldout_descriptions,
                                      model_config, shared_caption, train)
from llava_lite.config import WorldConfig
from llava_lite.facts import Obj
from llava_lite.probes import linear_probe, retrieval_recall, scene_recall
from llava_lite.vision import VisionTower


def test_description_names_every_object():
    objs = [Obj("red circle", (0.1, 0.1, 0.2, 0.2)), Obj("blue square", (0.5, 0.5, 0.9, 0.9)),
            Obj("green triangle", (0.7, 0.1, 0.8, 0.2))]
    for seed in range(20):
        text = describe(objs, random.Random(seed))
        assert all(o.name in text for o in objs), text


def test_trimmed_text_encoding_equals_open_clip_full_length():
    class Vocab:  # what model_config needs from a tokenizer
        eos_token_id, pad_token_id = 2, 0

        def __len__(self):
            return 20

    cfg = ClipTrainConfig(text_width=32, text_heads=2, text_layers=2, vision_width=32, vision_layers=1,
                          vision_head_width=16, embed_dim=16, context_length=12)
    model = build_model(model_config(cfg, Vocab()), cfg).eval()
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
    b = [Obj("red circle", (0.1, 0.1, 0.3, 0.3)), Obj("blue square", (0.6, 0.6, 0.9, 0.9)),
         Obj("green triangle", (0.6, 0.1, 0.9, 0.3))]
    objects = [a, b] * 50
    # every scene captioned "red circle and blue square" (true of a and of b: the terse caption
    # names three objects at most), or "A picture of three objects." (true of b only)
    caps = [["red circle and blue square", "A picture of two objects."] if i % 2 == 0 else
            ["red circle and blue square and green triangle", "A picture of three objects."] for i in range(100)]
    o = caption_truth_oracle(objects, caps, draws=50)
    assert o["coverage"] == 1.0 and o["n"] == 200
    # round 1: "red circle and blue square and green triangle" is not true of a; round 2 is unambiguous
    assert o["r@1"] == 1.0 and o["no_true_rival"] == 1.0
    caps = [["red circle and blue square", "A picture of two objects."] if i % 2 == 0 else
            ["Circles, squares and triangles, every kind of shape.", "A picture of three objects."] for i in range(100)]
    # scene b's round-1 rival "red circle and blue square" is not true of b (it has three objects and
    # the terse caption lists them all); a's rival is not true of a: still unambiguous
    assert caption_truth_oracle(objects, caps, draws=50)["r@1"] == 1.0
    caps = [["red circle and blue square", "A picture of two objects."] if i % 2 == 0 else
            ["A red circle and a blue square.", "A picture of three objects."] for i in range(100)]
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


def test_linear_probe_beats_majority_on_separable_labels():
    x = torch.randn(400, 8, generator=torch.Generator().manual_seed(0))
    y = (x[:, :2] > 0).float()
    r = linear_probe(x[:200], y[:200], x[200:], y[200:])
    assert r["accuracy"] > 0.95 and r["majority"] < 0.7


def test_counterfactual_changes_exactly_one_fact_and_its_description_says_so():
    objs = [Obj("red circle", (0.1, 0.1, 0.2, 0.2)), Obj("blue square", (0.5, 0.5, 0.9, 0.9)),
            Obj("green triangle", (0.7, 0.1, 0.8, 0.2))]
    rng, kinds, differ = random.Random(0), set(), 0
    for _ in range(300):
        new = counterfactual(objs, rng)
        changed = [(a, b) for a, b in zip(objs, new) if a != b]
        if all(a.box == b.box for a, b in changed):  # a shape or a colour changed, one object
            assert len(changed) == 1
            (a, b), = changed
            kinds.add("shape" if a.colour == b.colour else "colour")
            assert (a.colour == b.colour) != (a.kind == b.kind)
        else:  # two objects swapped places
            assert len(changed) == 2 and changed[0][0].box == changed[1][1].box
            kinds.add("swap")
        true, false, _ = description_pair(objs, rng)
        differ += true != false
    assert kinds == {"shape", "colour", "swap"}
    assert differ > 200  # only a swap described in random order reads the same


def test_hard_negative_raises_the_loss_when_the_image_matches_it_better():
    img = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    txt, ids = img.clone(), torch.arange(4).unsqueeze(1)
    ok = torch.tensor([True, True, False, False])
    far, near = -img, img + 0.01 * torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    scale = torch.tensor(10.0)
    base = contrastive_loss(img, txt, ids, scale)
    assert contrastive_loss(img, txt, ids, scale, far, ok) == pytest.approx(base.item(), abs=1e-3)
    assert contrastive_loss(img, txt, ids, scale, near, ok) > base + 0.1
    # a row without a valid negative is untouched (and no nan from the masked column)
    masked = contrastive_loss(img, txt, ids, scale, near, torch.zeros(4, dtype=torch.bool))
    assert torch.isfinite(masked) and masked == pytest.approx(base.item(), abs=1e-5)


@pytest.mark.slow
def test_tiny_clip_trains_at_smoke_size_and_saves_in_open_clip_format(tmp_path):
    wcfg = WorldConfig(image_size=32, splits={"pretrain": 64}, seed=5)
    world.generate(wcfg, tmp_path / "world", progress=False)
    cfg = ClipTrainConfig(image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_head_width=16,
                          text_width=32, text_layers=1, text_heads=2, embed_dim=32, steps=4, batch_size=16,
                          warmup_steps=1, eval_every=2, eval_scenes=100, metric_scenes=200, world=asdict(wcfg))
    out = tmp_path / "clip"
    m = train(cfg, tmp_path / "world", out, command="test")
    for name in ("open_clip_config.json", "open_clip_model.safetensors", "tokenizer.json", "README.md",
                 "train_log.jsonl", "loss.png", "metrics.json"):
        assert (out / name).is_file(), name
    assert 0 <= m["retrieval"]["r@1"] <= 1 and "shape" in m["probe_layer-2"]
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tok = open_clip.get_tokenizer(f"local-dir:{out}")
    ids = tok(["A red circle."])
    assert ids.shape == (1, cfg.context_length) and (ids == model.text_eos_id).sum() == 1
    assert VisionTower.load(str(out)).num_patches == 16

    # a second run starts from the first, with the counterfactual scenes drawn into the batch
    again = replace(cfg, steps=2, init=str(out), counterfactual_images=True)
    train(again, tmp_path / "world", tmp_path / "clip2", command="test")
    log = [json.loads(line) for line in (tmp_path / "clip2" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(math.isfinite(r["loss"]) for r in log)
    # it really started from the first run's weights: with lr 0 nothing moves
    train(replace(again, lr=0.0), tmp_path / "world", tmp_path / "clip3", command="test")
    a = load_file(str(out / "open_clip_model.safetensors"))
    b = load_file(str(tmp_path / "clip3" / "open_clip_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="another architecture"):
        train(replace(again, vision_width=64), tmp_path / "world", tmp_path / "clip4", command="test")


def test_clip_training_on_a_missing_gpu_fails_before_loading(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda: this machine has no CUDA GPU"):
        train(ClipTrainConfig(device="cuda"), tmp_path / "no-world", tmp_path / "out")
    assert not (tmp_path / "out").exists()
