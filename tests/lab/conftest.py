"""Scenes for the lab's tests: small held-out sets, and the tiny preset's pretrain split in memory."""

from __future__ import annotations

import pytest
import torch

from llava_lite import world
from llava_lite.coco import load_contexts
from llava_lite.config import get_preset
from llava_lite.io import write_json
from llava_lite.lab.tokenizers import tokenizer_corpus, train_tokenizer
from llava_lite.vision import to_uint8


def write_contexts(folder, scenes, cfg, split: str):
    """``scenes`` written as COCO files in ``folder`` and read back like any split."""
    instances, captions = world.coco_files(scenes, cfg, split)
    write_json(folder / f"instances_{split}.json", instances)
    write_json(folder / f"captions_{split}.json", captions)
    return load_contexts(folder / f"instances_{split}.json", folder / f"captions_{split}.json")


@pytest.fixture(scope="session")
def heldout_contexts(tmp_path_factory):
    """``heldout_contexts(n, seed)``: ``n`` scenes drawn beside the tiny preset's pretrain split (so
    none of them is one the shipped LM was trained on)."""

    def make(n: int, seed: int = 0):
        cfg = get_preset("tiny").world
        cfg.seed = seed
        cfg.splits = {"pretrain": cfg.splits["pretrain"], "heldout": n}
        return write_contexts(tmp_path_factory.mktemp("heldout"), world.sample_world(cfg)["heldout"], cfg, "heldout")

    return make


@pytest.fixture(scope="module")
def small_tokenizer(heldout_contexts):
    """A BPE trained on 120 scenes, and those scenes."""
    contexts = heldout_contexts(120, seed=7)
    return train_tokenizer(tokenizer_corpus(contexts), vocab_size=400), contexts


@pytest.fixture(scope="session")
def tiny_pretrain(tmp_path_factory):
    """The tiny preset's world as its cards' runs saw it: ``(world config, pretrain contexts, their
    images [N, 3, H, W] uint8, val contexts)``, drawn and rendered in memory (the scenes of
    ``llava-lite world --preset tiny``, without writing 20000 images)."""
    cfg = get_preset("tiny").world
    splits = world.sample_world(cfg)
    folder = tmp_path_factory.mktemp("tiny-world")
    pretrain = write_contexts(folder, splits["pretrain"], cfg, "pretrain")
    val = write_contexts(folder, splits["val"], cfg, "val")
    images = torch.stack([to_uint8(world.render(s).convert("RGB")) for s in splits["pretrain"]])
    return cfg, pretrain, images, val
