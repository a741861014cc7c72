"""The shapes world: deterministic, disjoint, readable by COCO consumers, captions that tell the truth."""

import hashlib
import json
import random
from pathlib import Path

import pytest
from PIL import Image

from llava_lite import facts, world
from llava_lite.cli import main
from llava_lite.config import WorldConfig
from llava_lite.facts import Obj

import kill_worker


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_gives_same_bytes_and_another_seed_does_not(tmp_path):
    cfg = WorldConfig(splits={"train": 12, "test": 4})
    world.generate(cfg, tmp_path / "a", progress=False)
    world.generate(cfg, tmp_path / "b", progress=False)
    world.generate(WorldConfig(seed=1, splits={"train": 12, "test": 4}), tmp_path / "c", progress=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_splits_are_disjoint_even_for_single_object_scenes():
    cfg = WorldConfig(image_size=16, max_objects=1, splits={"pretrain": 300, "train": 300, "test": 100})
    scenes = world.sample_world(cfg)
    signatures = [s.signature() for split in scenes.values() for s in split]
    assert len(signatures) == len(set(signatures)) == 700


def test_scenes_have_one_to_six_objects_that_never_touch(small_world):
    scenes = world.sample_world(WorldConfig(splits={"train": 400}))["train"]
    counts = {len(s.shapes) for s in scenes}
    assert counts == {1, 2, 3, 4, 5, 6}
    for s in scenes:
        for i, a in enumerate(s.shapes):
            for b in s.shapes[i + 1 :]:
                apart = a.x + a.side < b.x or b.x + b.side < a.x or a.y + a.side < b.y or b.y + b.side < a.y
                assert apart, f"scene {s.image_id}: {a} touches {b}"


def test_annotations_read_like_coco_for_pycocotools(small_world):
    from pycocotools.coco import COCO

    for split in ("pretrain", "train", "val", "test"):
        inst = COCO(str(small_world / "annotations" / f"instances_{split}.json"))
        caps = COCO(str(small_world / "annotations" / f"captions_{split}.json"))
        img_ids = inst.getImgIds()
        assert len(img_ids) == len(set(img_ids)) and len(inst.dataset["images"]) == len(img_ids)
        ann_ids = [a["id"] for a in inst.dataset["annotations"]]
        assert len(ann_ids) == len(set(ann_ids))
        for ann in inst.loadAnns(inst.getAnnIds()):
            img = inst.loadImgs(ann["image_id"])[0]  # every annotation's image exists
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"]
            assert 0 < ann["area"] <= w * h and ann["iscrowd"] == 0
            assert inst.annToMask(ann).sum() > 0  # the polygon rasterises
        for img_id in img_ids:
            texts = [a["caption"] for a in caps.loadAnns(caps.getAnnIds(imgIds=[img_id]))]
            assert len(texts) == 5 and len(set(texts)) == 5
            png = Image.open(small_world / split / inst.loadImgs(img_id)[0]["file_name"])
            assert png.size == (64, 64)


def test_boxes_match_the_drawn_pixels():
    scene = world.sample_world(WorldConfig(splits={"train": 1}, seed=3))["train"][0]
    img = Image.new("RGB", (1, 1))
    img = world.render(scene)
    for sh in scene.shapes:
        crop = img.crop((sh.x, sh.y, sh.x + sh.side, sh.y + sh.side))
        outside = img.crop((max(0, sh.x - 1), sh.y, sh.x, sh.y + sh.side))
        # the shape's colour is in its box; the column left of the box is background
        assert any(max(abs(p - q) for p, q in zip(px, sh.tint)) < 30 for px in crop.get_flattened_data())
        assert all(max(abs(p - q) for p, q in zip(px, scene.background)) < 30 for px in outside.get_flattened_data())


def _one_fact_changed(objs: list[Obj], rng: random.Random) -> list[Obj]:
    """The objects with one shape, one colour, or two places changed (the test's own edit)."""
    objs, i = list(objs), rng.randrange(len(objs))
    o, kind = objs[i], rng.choice(["shape", "colour"] + (["swap"] if len(objs) > 1 else []))
    if kind == "shape":
        objs[i] = Obj(f"{o.colour} {next(s for s in facts.SHAPES if s != o.kind)}", o.box)
    elif kind == "colour":
        objs[i] = Obj(f"{next(c for c in facts.COLOURS if c != o.colour)} {o.kind}", o.box)
    else:
        j = (i + 1) % len(objs)
        objs[i], objs[j] = Obj(o.name, objs[j].box), Obj(objs[j].name, o.box)
    return objs


def test_a_scene_redrawn_with_one_fact_changed_shows_that_change_only():
    scenes = world.sample_world(WorldConfig(splits={"train": 40}, seed=4))["train"]
    rng, changed_kinds = random.Random(0), set()
    for scene in scenes:
        same = world.with_objects(scene, scene.objects(), rng)
        assert same == scene and world.render(same).tobytes() == world.render(scene).tobytes()
        objs = _one_fact_changed(scene.objects(), rng)
        twin = world.with_objects(scene, objs, rng)
        got = twin.objects()
        assert [o.name for o in got] == [o.name for o in objs]
        assert all(max(abs(a - b) for a, b in zip(g.box, o.box)) < 1e-9 for g, o in zip(got, objs))
        for old, new in zip(scene.shapes, twin.shapes):
            if old.colour == new.colour:
                assert new.tint == old.tint  # an unchanged colour keeps its drawn tint
            changed_kinds.add(
                "shape"
                if old.shape != new.shape
                else "colour"
                if old.colour != new.colour
                else "place"
                if old.x != new.x or old.y != new.y
                else "none"
            )
        if twin != scene:
            assert world.render(twin).tobytes() != world.render(scene).tobytes()
    assert {"shape", "colour", "place"} <= changed_kinds
    n = len(scenes[0].shapes)
    with pytest.raises(ValueError, match=f"{n + 1} objects for {n} shapes"):
        world.with_objects(
            scenes[0], scenes[0].objects() * 2 if n == 1 else scenes[0].objects() + scenes[0].objects()[:1], rng
        )


def test_captions_are_varied_across_the_world():
    scenes = world.sample_world(WorldConfig(splits={"train": 200}))["train"]
    caps = [c for s in scenes for c in world.captions(s, random.Random(s.image_id))]
    openings = {" ".join(c.split()[:2]) for c in caps}
    assert len(set(caps)) > 0.7 * len(caps)  # short ones ("Shapes in red and blue.") recur, as in real captions
    assert len(openings) > 40, "captions should not share one template"


def test_relations_stated_in_captions_hold_for_the_boxes():
    scenes = world.sample_world(WorldConfig(splits={"train": 300}))["train"]
    checked = 0
    for s in scenes:
        objs = s.objects()
        for cap in world.captions(s, random.Random(s.image_id)):
            for rel, phrase in facts.RELATION_PHRASES.items():
                if f" {phrase} " not in cap:
                    continue
                left, right = cap.rstrip(".").removesuffix(" sits").split(f" {phrase} ")
                left = left.removesuffix(" sits").removesuffix(" is")
                a_name = " ".join(left.split()[-2:])
                b_name = " ".join(right.split()[-2:])
                ok = any(
                    facts.holds(a, rel, b)
                    for a in objs
                    for b in objs
                    if a is not b and a.name == a_name and b.name == b_name
                )
                assert ok, f"scene {s.image_id}: {cap!r} does not hold"
                checked += 1
    assert checked > 100


def test_cli_writes_the_requested_splits(tmp_path):
    assert main(["world", "--out", str(tmp_path), "--split", "train=5", "--split", "test=2", "--image-size", "32"]) == 0
    inst = json.loads((tmp_path / "annotations" / "instances_train.json").read_text())
    assert len(inst["images"]) == 5 and inst["images"][0]["width"] == 32
    assert main(["world", "--out", str(tmp_path), "--split", "train"]) == 1  # a clear error, not a trace


def test_generate_resumes_finished_splits_without_rewriting(tmp_path):
    cfg = WorldConfig(splits={"train": 6, "test": 3})
    world.generate(cfg, tmp_path, progress=False)
    ann = tmp_path / "annotations" / "instances_train.json"
    before = ann.stat().st_mtime_ns
    (tmp_path / "annotations" / "instances_test.json").unlink()  # as if stopped during the test split
    world.generate(cfg, tmp_path, progress=False)
    assert ann.stat().st_mtime_ns == before
    assert (tmp_path / "annotations" / "instances_test.json").exists()


def test_a_finished_world_is_not_redrawn_and_a_changed_config_is(tmp_path, monkeypatch):
    cfg = WorldConfig(splits={"train": 6, "test": 3})
    world.generate(cfg, tmp_path, progress=False)
    real = world.sample_world

    def must_not_draw(c):
        raise AssertionError("sample_world ran for a world that is up to date")

    monkeypatch.setattr(world, "sample_world", must_not_draw)
    assert world.generate(cfg, tmp_path, progress=False) == {"train": 6, "test": 3}
    monkeypatch.setattr(world, "sample_world", real)
    stamp = tmp_path / "annotations" / "world_train.json"
    changed = WorldConfig(seed=1, splits={"train": 6, "test": 3})
    world.generate(changed, tmp_path, progress=False)
    assert json.loads(stamp.read_text())["config"]["seed"] == 1
    inst = json.loads((tmp_path / "annotations" / "instances_train.json").read_text())
    assert inst["info"]["config"]["seed"] == 1


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_world_killed_mid_image_mid_render_and_mid_annotations_ends_byte_for_byte(tmp_path):
    rng = random.Random(7)
    cfg = {"image_size": 32, "splits": {"train": 12, "val": 4}, "seed": 5}
    world.generate(WorldConfig(**cfg), tmp_path / "straight", progress=False)
    kills = [
        {"call": "PIL.Image:Image.save", "n": rng.randint(2, 11), "half": True},  # inside an image's write
        {"call": "llava_lite.world:render", "n": rng.randint(2, 11)},  # between two images
        {"call": "llava_lite.io:fsync_path", "n": 1, "half": True},  # inside the annotations' write
    ]
    root = tmp_path / "run"
    assert kill_worker.kill_and_resume("world", {"cfg": cfg, "root": str(root)}, kills, tmp_path) == [-9, -9, -9]
    assert kill_worker.temp_files(root)
    world.generate(WorldConfig(**cfg), root, progress=False)
    assert kill_worker.temp_files(root) == []
    assert _files(root) == _files(tmp_path / "straight")
