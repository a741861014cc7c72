"""LLaVA's released data in its two layouts (LLaVA-Pretrain's caption JSON with images/ beside it,
LLaVA-Instruct-150K's instruction JSON over COCO train2017): the validator accepts them, and
imported as a split they feed the feature cache and the stages unchanged."""

import json
from pathlib import Path

import pytest
from PIL import Image

from llava_lite import cli, released, stages, validate
from llava_lite.paths import Layout
from llava_lite.vision import VisionTower


def _image(path: Path, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48, 32), colour).save(path, format="JPEG")


def _turns(q: str, a: str) -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture
def pretrain(tmp_path) -> Path:
    """LLaVA-Pretrain's layout: blip_laion_cc_sbu_558k.json and images/<shard>/<id>.jpg."""
    root = tmp_path / "LLaVA-Pretrain"
    samples = []
    for i, sid in enumerate(("004539375", "002239345", "004539376")):
        image = f"{sid[:5]}/{sid}.jpg"
        _image(root / "images" / image, (60 * i, 90, 120))
        q = (
            "Give a brief description of the image.\n<image>"
            if i % 2
            else "<image>\nWrite a terse but informative summary."
        )
        samples.append({"id": sid, "image": image, "conversations": _turns(q, f"a small test picture number {i}")})
    (root / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(samples))
    return root


@pytest.fixture
def instruct(tmp_path) -> Path:
    """LLaVA-Instruct-150K's layout: llava_instruct_150k.json keyed by COCO image id (one id for an
    image's conversation, detail and complex samples), images in coco/train2017/; plus a text-only
    sample as the later mixes carry."""
    root = tmp_path / "LLaVA-Instruct-150K"
    for sid, colour in (("000000033471", (200, 10, 10)), ("000000052846", (10, 200, 10))):
        _image(tmp_path / "coco" / "train2017" / f"{sid}.jpg", colour)
    one = "000000033471"
    samples = [
        {
            "id": one,
            "image": f"{one}.jpg",
            "conversations": _turns("<image>\nWhat colour is the bus?", "The bus is red.")
            + _turns("Is it moving?", "No, it is parked at the kerb."),
        },
        {"id": one, "image": f"{one}.jpg", "conversations": _turns("Describe the image.\n<image>", "A red bus.")},
        {"id": one, "image": f"{one}.jpg", "conversations": _turns("<image>\nWhy stop here?", "It is a bus stop.")},
        {"id": "000000052846", "image": "000000052846.jpg", "conversations": _turns("<image>\nWhat is it?", "Grass.")},
        {"id": "text-0001", "conversations": _turns("Name a prime number.", "Seven.")},
    ]
    root.mkdir()
    (root / "llava_instruct_150k.json").write_text(json.dumps(samples))
    return root


def test_the_validator_accepts_both_released_layouts_with_their_image_folders(pretrain, instruct):
    assert validate.validate_file(pretrain / "blip_laion_cc_sbu_558k.json", pretrain / "images").ok
    assert validate.validate_file(instruct / "llava_instruct_150k.json").ok


def test_released_samples_get_unique_ids_and_a_type_per_stage(pretrain, instruct):
    caps = released.read_released(pretrain / "blip_laion_cc_sbu_558k.json", stage=1)
    assert [s["type"] for s in caps] == ["caption"] * 3 and caps[0]["id"] == "004539375-1"
    inst = released.read_released(instruct / "llava_instruct_150k.json", stage=2)
    assert [s["id"] for s in inst[:3]] == ["000000033471-1", "000000033471-2", "000000033471-3"]
    assert {s["type"] for s in inst} == {"instruct"}
    named = instruct / "detail_23k.json"
    named.write_text(json.dumps(json.loads((instruct / "llava_instruct_150k.json").read_text())[1:2]))
    assert released.read_released(named, stage=2)[0]["type"] == "detail"


def test_an_imported_split_feeds_the_feature_cache_and_the_stages(pretrain, instruct, tmp_path):
    layout = Layout(tmp_path / "out" / "colab")
    counts = released.import_split(pretrain / "blip_laion_cc_sbu_558k.json", pretrain / "images", layout, "pretrain", 1)
    assert counts == {"samples": 3, "images": 3, "text_only_left_out": 0}
    counts = released.import_split(
        instruct / "llava_instruct_150k.json", tmp_path / "coco" / "train2017", layout, "train", 2
    )
    assert counts == {"samples": 4, "images": 2, "text_only_left_out": 1}
    assert len(stages.stage_samples(layout, "pretrain", 1)) == 3 and len(stages.stage_samples(layout, "train", 2)) == 4
    tower = VisionTower.load("tiny-clip")
    feats = stages.split_features(layout, "pretrain", tower, progress=False)
    assert tuple(feats("00453/004539375.jpg").shape) == (tower.num_patches, tower.width)


def test_a_missing_image_is_named_and_the_command_imports_a_split(pretrain, tmp_path, monkeypatch):
    (pretrain / "images" / "00223" / "002239345.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 images of .* are missing, e\.g\. \['00223/002239345\.jpg'\]"):
        released.import_split(pretrain / "blip_laion_cc_sbu_558k.json", pretrain / "images", Layout(tmp_path / "x"))
    _image(pretrain / "images" / "00223" / "002239345.jpg", (1, 2, 3))
    monkeypatch.setenv("LLAVA_LITE_OUTPUTS", str(tmp_path / "out"))
    argv = ["released", str(pretrain / "blip_laion_cc_sbu_558k.json"), "--images", str(pretrain / "images")]
    assert cli.main(argv + ["--stage", "1", "--split", "pretrain"]) == 0
    assert len(stages.stage_samples(Layout.for_preset("colab"), "pretrain", 1)) == 3
