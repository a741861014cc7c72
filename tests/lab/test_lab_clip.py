"""The tiny CLIP's pretraining: counterfactual texts change one fact, the hard negative is scored,
a smoke-size run saves what open_clip loads, and the card's first run still makes its first steps."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import open_clip
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors.torch import load_file

from llava_lite import jsonl, world
from llava_lite.config import WorldConfig
from llava_lite.facts import Obj
from llava_lite.lab import clip
from llava_lite.lab.clip import build_model, contrastive_loss, model_config, train
from llava_lite.lab.clip_texts import N_DESCRIPTIONS, TextBank, counterfactual, description_pair
from llava_lite.lab.config import ClipArchitecture, ClipRuntime, ClipTexts, ClipTraining
from llava_lite.vision import VisionTower

OBJS = [
    Obj("red circle", (0.1, 0.1, 0.2, 0.2)),
    Obj("blue square", (0.5, 0.5, 0.9, 0.9)),
    Obj("green triangle", (0.7, 0.1, 0.8, 0.2)),
]
SMOKE = ClipArchitecture(
    image_size=32,
    patch_size=8,
    vision_width=32,
    vision_layers=2,
    vision_head_width=16,
    text_width=32,
    text_layers=1,
    text_heads=2,
    embed_dim=32,
)


def test_counterfactual_changes_exactly_one_fact_and_its_description_says_so():
    rng, kinds, differ = random.Random(0), set(), 0
    for _ in range(300):
        new = counterfactual(OBJS, rng)
        changed = [(a, b) for a, b in zip(OBJS, new) if a != b]
        if all(a.box == b.box for a, b in changed):  # a shape or a colour changed, one object
            assert len(changed) == 1
            ((a, b),) = changed
            kinds.add("shape" if a.colour == b.colour else "colour")
            assert (a.colour == b.colour) != (a.kind == b.kind)
        else:  # two objects swapped places
            assert len(changed) == 2 and changed[0][0].box == changed[1][1].box
            kinds.add("swap")
        true, false, _ = description_pair(OBJS, rng)
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


def test_text_bank_draws_each_kind_of_text_in_its_share():
    scenes = world.sample_world(WorldConfig(splits={"pretrain": 60}, seed=3))["pretrain"]
    caps = [world.captions(s, random.Random(s.image_id)) for s in scenes]
    bank = TextBank(caps, [s.objects() for s in scenes], random.Random(0), context_length=40)
    assert bank.captions.shape == (60, 5, 40) and bank.descriptions.shape == (60, N_DESCRIPTIONS, 40)
    gen, counts, n = torch.Generator().manual_seed(0), torch.zeros(3), 0
    for _ in range(50):
        idx = torch.randint(60, (40,), generator=gen)
        tb = bank.draw(idx, gen, ClipTexts(describe_prob=0.3, shape_prob=0.2))
        full = (tb.ids == bank.descriptions[idx, tb.k]).all(1)
        shape = ~full & (tb.ids == bank.shape_only[idx, tb.k]).all(1)
        counts += torch.stack([full.sum(), shape.sum(), (~full & ~shape).sum()])
        n += 40
        assert not (tb.neg_ok & ~(full | shape)).any()  # a caption has no counterfactual
        assert (tb.neg_ids[tb.neg_ok] != tb.ids[tb.neg_ok]).any(1).all()
    assert (counts / n).tolist() == pytest.approx([0.3, 0.2, 0.5], abs=0.04)


def test_a_built_clip_knows_its_preprocessing_as_a_loaded_one_does():
    class Vocab:  # what model_config needs from a tokenizer
        eos_token_id, pad_token_id = 2, 0

        def __len__(self):
            return 20

    model = build_model(model_config(SMOKE, Vocab()), init_temperature=0.05)
    pp = open_clip.get_model_preprocess_cfg(model)
    assert pp["mean"] == list(OPENAI_DATASET_MEAN) and pp["std"] == list(OPENAI_DATASET_STD)
    assert model.logit_scale.exp().item() == pytest.approx(20.0)


@pytest.mark.slow
def test_tiny_clip_trains_at_smoke_size_and_saves_in_open_clip_format(tmp_path):
    wcfg = WorldConfig(image_size=32, splits={"pretrain": 64}, seed=5)
    world.generate(wcfg, tmp_path / "world", progress=False)
    texts, training = ClipTexts(), ClipTraining(steps=4, batch_size=16, warmup_steps=1)
    runtime = ClipRuntime(eval_every=2, eval_scenes=100, metric_scenes=200)
    out = tmp_path / "clip"
    m = train(SMOKE, texts, training, runtime, wcfg, tmp_path / "world", out, command="test")
    for name in (
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "tokenizer.json",
        "README.md",
        "train_log.jsonl",
        "loss.png",
        "metrics.json",
    ):
        assert (out / name).is_file(), name
    assert 0 <= m["retrieval"]["r@1"] <= 1 and "shape" in m["probe_layer-2"]
    assert m["config"]["vision_width"] == 32 and m["config"]["world"]["image_size"] == 32
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tok = open_clip.get_tokenizer(f"local-dir:{out}")
    ids = tok(["A red circle."])
    assert ids.shape == (1, SMOKE.context_length) and (ids == model.text_eos_id).sum() == 1
    assert VisionTower.load(str(out)).num_patches == 16

    # a second run starts from the first, with the counterfactual scenes drawn into the batch
    again = replace(training, steps=2, init=str(out))
    twins = replace(texts, counterfactual_images=True)
    train(SMOKE, twins, again, runtime, wcfg, tmp_path / "world", tmp_path / "clip2", command="test")
    log = [rec for _, rec in jsonl.read_jsonl(tmp_path / "clip2" / "train_log.jsonl")]
    assert len(log) == 2 and all(math.isfinite(r["loss"]) for r in log)
    # it really started from the first run's weights: with lr 0 nothing moves
    train(SMOKE, twins, replace(again, lr=0.0), runtime, wcfg, tmp_path / "world", tmp_path / "clip3", command="test")
    a = load_file(str(out / "open_clip_model.safetensors"))
    b = load_file(str(tmp_path / "clip3" / "open_clip_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="another architecture"):
        train(replace(SMOKE, vision_width=64), twins, again, runtime, wcfg, tmp_path / "world", tmp_path / "clip4")


def test_clip_training_on_a_missing_gpu_fails_before_loading(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda: this machine has no CUDA GPU"):
        train(
            ClipArchitecture(),
            ClipTexts(),
            ClipTraining(),
            ClipRuntime(device="cuda"),
            WorldConfig(),
            tmp_path / "no-world",
            tmp_path / "out",
        )
    assert not (tmp_path / "out").exists()


# run H of the tiny-clip card (the first, from random weights, on the project's 2-core CPU): the
# first five losses of its train_log.jsonl (git show 3c9a330:data/pretrained/tiny-clip/train_log.jsonl)
H_FIRST_LOSSES = [5.008, 4.9681, 4.9619, 4.921, 4.9141]


@pytest.mark.slow
def test_the_cards_first_run_makes_its_logged_first_steps(tiny_pretrain, tmp_path, monkeypatch):
    """Run H's command (``--patch-size 8 --vision-width 64 --vision-layers 4 --text-layers 2 --steps
    3000 --batch-size 128 --lr 0.002 --seed 0 --threads 1``) for its first five steps: the losses of
    its log, to the rounding of another torch build's CPU kernels."""
    world_cfg, pretrain, images, _ = tiny_pretrain
    losses, step = [], clip._train_step

    def logged(*args, **kwargs):
        losses.append(step(*args, **kwargs))
        if len(losses) == len(H_FIRST_LOSSES):
            raise _Stop
        return losses[-1]

    monkeypatch.setattr(clip, "_train_step", logged)
    data = (images, [c.captions for c in pretrain], [c.objects for c in pretrain])
    with pytest.raises(_Stop):
        train(
            ClipArchitecture(patch_size=8, vision_width=64, vision_layers=4, text_layers=2),
            ClipTexts(),
            ClipTraining(steps=3000, batch_size=128, lr=0.002, seed=0),
            ClipRuntime(threads=1, eval_scenes=100),
            world_cfg,
            tmp_path / "unused",
            tmp_path / "H",
            data=data,
        )
    assert losses == pytest.approx(H_FIRST_LOSSES, rel=0.002)


class _Stop(Exception):
    pass
