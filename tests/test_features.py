"""The feature cache: equal to on-the-fly features, resumable without recomputation, never mixing
towers, and a corrupt image names itself without leaving a partial shard."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llava_lite import cli, world
from llava_lite.config import WorldConfig
from llava_lite.features import FeatureReader, cache_folder, extract, split_images
from llava_lite.vision import ImageReadError, VisionTower

import kill_worker

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 3, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 16, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    world.generate(WorldConfig(image_size=32, splits={"train": 10}, seed=3), root, progress=False)
    return root / "annotations" / "instances_train.json", root / "train"


def count_forwards(t: VisionTower) -> list:
    calls = []
    t.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    return calls


def test_cached_features_equal_on_the_fly_features(split, tmp_path):
    inst, images = split
    t = VisionTower.from_config(TINY_CFG)
    folder = extract(t, inst, images, cache_folder(tmp_path, t, "train"), batch_size=3, shard_size=4, progress=False)
    reader = FeatureReader(folder, expect_key=t.cache_key)
    recs = split_images(inst)
    assert len(reader) == 10 and reader.tokens == 16 and reader.width == 32
    fresh = t.encode([images / r.file_name for r in recs])  # [10, 16, 32]
    cached = reader.get_many([r.image_id for r in recs])
    assert cached.dtype == torch.float16
    torch.testing.assert_close(cached.float(), fresh, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(reader(recs[4].file_name), reader[recs[4].image_id])  # by file name too


def test_resume_after_a_crash_recomputes_only_unfinished_shards(split, tmp_path):
    inst, images = split
    work = tmp_path / "images"
    shutil.copytree(images, work)
    recs = split_images(inst)
    victim = work / recs[5].file_name  # in the second shard of three (shard size 4)
    original = victim.read_bytes()
    victim.write_bytes(original[: len(original) // 2])

    t = VisionTower.from_config(TINY_CFG)
    calls = count_forwards(t)
    out = cache_folder(tmp_path / "features", t, "train")
    with pytest.raises(ImageReadError, match=victim.name):
        extract(t, inst, work, out, batch_size=2, shard_size=4, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.safetensors"]  # no partial shard, no temp file
    first_shard = (out / "shard-00000.safetensors").read_bytes()
    assert sum(calls) == 4  # shard 0's four images; shard 1 failed while loading its first batch
    calls.clear()

    victim.write_bytes(original)  # the image is repaired; run again
    extract(t, inst, work, out, batch_size=2, shard_size=4, progress=False)
    assert sum(calls) == 6  # images of shards 1 and 2 only: nothing finished was recomputed
    assert (out / "shard-00000.safetensors").read_bytes() == first_shard
    calls.clear()
    extract(t, inst, work, out, batch_size=2, shard_size=4, progress=False)
    assert calls == []  # a finished cache costs no forward pass at all
    assert len(FeatureReader(out)) == 10


def test_two_layers_never_share_a_cache_folder(split, tmp_path):
    inst, images = split
    a = VisionTower.from_config(TINY_CFG, layer=-2)
    b = VisionTower.from_config(TINY_CFG, layer=-1)
    fa = extract(a, inst, images, cache_folder(tmp_path, a, "train"), progress=False)
    fb = extract(b, inst, images, cache_folder(tmp_path, b, "train"), progress=False)
    assert fa != fb
    with pytest.raises(ValueError, match="layer-1"):
        FeatureReader(fb, expect_key=a.cache_key)
    rid = split_images(inst)[0].image_id
    assert not torch.equal(FeatureReader(fa)[rid], FeatureReader(fb)[rid])


def test_a_shard_of_another_tower_is_recomputed_not_trusted(split, tmp_path):
    inst, images = split
    a = VisionTower.from_config(TINY_CFG, seed=0)
    b = VisionTower.from_config(TINY_CFG, seed=1)
    out = tmp_path / "same-folder"
    extract(a, inst, images, out, shard_size=4, progress=False)
    calls = count_forwards(b)
    extract(b, inst, images, out, batch_size=4, shard_size=4, progress=False)
    assert sum(calls) == 10
    assert FeatureReader(out).cache_key == b.cache_key


def test_unknown_image_id_names_the_folder(split, tmp_path):
    inst, images = split
    t = VisionTower.from_config(TINY_CFG)
    folder = extract(t, inst, images, tmp_path / "f", progress=False)
    with pytest.raises(KeyError, match="424242"):
        FeatureReader(folder)[424242]


def test_cli_caches_a_split_with_the_presets_tower_in_a_folder_named_by_its_key(small_world, tmp_path):
    out = tmp_path / "features"
    assert (
        cli.main(
            [
                "features",
                "--preset",
                "tiny",
                "--split",
                "train",
                "--world",
                str(small_world),
                "--out",
                str(out),
                "--batch-size",
                "16",
                "--shard-size",
                "32",
            ]
        )
        == 0
    )
    tower = VisionTower.load("tiny-clip")
    reader = FeatureReader(cache_folder(out, tower, "train"), expect_key=tower.cache_key)
    assert len(reader) == 60 and reader.tokens == 64 and "layer-2__nocls" in reader.cache_key


def test_a_redrawn_world_with_the_same_ids_is_recomputed_not_reused(tmp_path):
    root_a, root_b = tmp_path / "a", tmp_path / "b"
    world.generate(WorldConfig(image_size=32, splits={"train": 6}, seed=3), root_a, progress=False)
    world.generate(WorldConfig(image_size=32, splits={"train": 6}, seed=4), root_b, progress=False)
    t = VisionTower.from_config(TINY_CFG)
    out = cache_folder(tmp_path / "features", t, "train")
    extract(t, root_a / "annotations" / "instances_train.json", root_a / "train", out, shard_size=4, progress=False)
    calls = count_forwards(t)
    # same image ids and file names, other pictures: nothing of the old cache may be served
    extract(t, root_b / "annotations" / "instances_train.json", root_b / "train", out, shard_size=4, progress=False)
    assert sum(calls) == 6
    fresh = t.encode(
        [root_b / "train" / r.file_name for r in split_images(root_b / "annotations" / "instances_train.json")]
    )
    torch.testing.assert_close(FeatureReader(out).get_many(list(range(1, 7))).float(), fresh, atol=2e-3, rtol=2e-3)


def test_a_finished_cache_is_checked_by_a_stat_of_each_image_not_a_read(split, tmp_path, monkeypatch):
    inst, images = split
    t = VisionTower.from_config(TINY_CFG)
    out = cache_folder(tmp_path, t, "train")
    extract(t, inst, images, out, batch_size=4, shard_size=4, progress=False)
    reads = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda p: (reads.append(p.name), real(p))[1])
    extract(t, inst, images, out, batch_size=4, shard_size=4, progress=False)
    assert [r for r in reads if r.endswith(".png")] == []  # old: every image of the split read and hashed again


@pytest.mark.slow
def test_extraction_killed_mid_shard_and_mid_encoding_ends_with_an_unbroken_runs_cache(split, tmp_path):
    inst, images = split
    rng = random.Random(11)
    t = VisionTower.from_config(TINY_CFG)
    straight = extract(t, inst, images, tmp_path / "straight", batch_size=2, shard_size=3, progress=False)
    kills = [
        {"call": "llava_lite.vision:VisionTower.encode", "n": rng.randint(2, 4)},  # inside a shard's images
        {"call": "llava_lite.features:save_file", "n": rng.randint(1, 3), "half": True},  # inside a shard's write
    ]
    out = tmp_path / "run"
    args = {"instances": str(inst), "images": str(images), "out": str(out), "tower": TINY_CFG}
    assert kill_worker.kill_and_resume("features", args, kills, tmp_path) == [-9, -9]
    assert kill_worker.temp_files(out)
    extract(t, inst, images, out, batch_size=2, shard_size=3, progress=False)
    assert kill_worker.temp_files(out) == []
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in straight.iterdir())
    for p in straight.iterdir():
        if p.suffix != ".safetensors":
            assert (out / p.name).read_bytes() == p.read_bytes(), p.name
            continue
        with safe_open(str(p), "pt") as a, safe_open(str(out / p.name), "pt") as b:
            assert a.metadata() == b.metadata() and set(a.keys()) == set(b.keys()), p.name
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys()), p.name  # noqa: SIM118
