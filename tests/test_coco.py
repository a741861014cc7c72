"""Symbolic contexts from COCO files, and one clear error per malformed record."""

import copy
import json

import pytest

from llava_lite import coco


def _pair(tmp_path, inst, caps):
    ip, cp = tmp_path / "instances_x.json", tmp_path / "captions_x.json"
    ip.write_text(json.dumps(inst))
    cp.write_text(json.dumps(caps))
    return ip, cp


@pytest.fixture
def real_coco_style():
    """Records shaped as COCO 2017 writes them (people, animals, many boxes, float boxes)."""
    inst = {
        "images": [
            {"id": 139, "file_name": "000000000139.jpg", "width": 640, "height": 426},
            {"id": 285, "file_name": "000000000285.jpg", "width": 586, "height": 640},
        ],
        "categories": [
            {"id": 1, "name": "person", "supercategory": "person"},
            {"id": 23, "name": "bear", "supercategory": "animal"},
            {"id": 62, "name": "chair", "supercategory": "furniture"},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 139,
                "category_id": 1,
                "bbox": [412.8, 157.61, 53.05, 138.01],
                "area": 4000.1,
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 139,
                "category_id": 62,
                "bbox": [291.87, 218.54, 60.42, 97.94],
                "area": 3000.0,
                "iscrowd": 0,
            },
            {
                "id": 3,
                "image_id": 285,
                "category_id": 23,
                "bbox": [0.0, 50.0, 586.0, 590.0],
                "area": 200000.0,
                "iscrowd": 0,
            },
        ],
    }
    caps = {
        "annotations": [
            {"id": 10 + i, "image_id": 139, "caption": f"A woman stands in a living room {i}."} for i in range(5)
        ]
        + [{"id": 20 + i, "image_id": 285, "caption": f"A big brown bear {i}. "} for i in range(6)]
    }
    return inst, caps


def test_context_has_captions_blank_line_and_normalised_boxes(tmp_path, real_coco_style):
    contexts = coco.load_contexts(*_pair(tmp_path, *real_coco_style))
    assert [c.image_id for c in contexts] == [139, 285]
    lines = contexts[0].text().split("\n")
    assert lines[:5] == [f"A woman stands in a living room {i}." for i in range(5)]
    assert lines[5] == ""
    assert lines[6] == "person: [0.645, 0.370, 0.728, 0.694]"
    assert lines[7] == "chair: [0.456, 0.513, 0.550, 0.743]"
    assert len(contexts[1].captions) == 6 and contexts[1].text().endswith("bear: [0.000, 0.078, 1.000, 1.000]")


def test_world_contexts_load(small_world):
    contexts = coco.load_contexts(
        small_world / "annotations" / "instances_val.json", small_world / "annotations" / "captions_val.json"
    )
    assert len(contexts) == 20 and all(len(c.captions) == 5 and c.objects for c in contexts)


def _break(real_coco_style, where, fn):
    inst, caps = copy.deepcopy(real_coco_style)
    fn(inst if where == "inst" else caps)
    return inst, caps


@pytest.mark.parametrize(
    "case, where, breaker, expected",
    [
        (
            "missing bbox",
            "inst",
            lambda d: d["annotations"][1].pop("bbox"),
            r"annotations\[1\] \(id 2\): missing key 'bbox'",
        ),
        (
            "missing image_id in caption",
            "caps",
            lambda d: d["annotations"][3].pop("image_id"),
            r"annotations\[3\] \(id 13\): missing key 'image_id'",
        ),
        (
            "missing file_name",
            "inst",
            lambda d: d["images"][1].pop("file_name"),
            r"images\[1\] \(id 285\): missing key 'file_name'",
        ),
        (
            "missing top-level annotations",
            "inst",
            lambda d: d.pop("annotations"),
            r"missing top-level key 'annotations'",
        ),
        (
            "box outside the image",
            "inst",
            lambda d: d["annotations"][0].update(bbox=[600.0, 10.0, 80.0, 20.0]),
            r"annotations\[0\] \(id 1\): bbox \[600.0, 10.0, 80.0, 20.0\] lies outside image 139 \(640x426\)",
        ),
        (
            "negative box",
            "inst",
            lambda d: d["annotations"][2].update(bbox=[10, 10, -5, 4]),
            r"annotations\[2\] \(id 3\): bbox .* lies outside",
        ),
        (
            "malformed box",
            "inst",
            lambda d: d["annotations"][2].update(bbox=[1, 2, 3]),
            r"annotations\[2\] \(id 3\): bbox should be \[x, y, w, h\]",
        ),
        (
            "annotation for unknown image",
            "inst",
            lambda d: d["annotations"][2].update(image_id=999),
            r"annotations\[2\] \(id 3\): annotation for unknown image id 999",
        ),
        (
            "caption for unknown image",
            "caps",
            lambda d: d["annotations"][0].update(image_id=7),
            r"annotations\[0\] \(id 10\): caption for unknown image id 7",
        ),
        (
            "unknown category",
            "inst",
            lambda d: d["annotations"][0].update(category_id=5),
            r"annotations\[0\] \(id 1\): unknown category id 5",
        ),
        (
            "duplicate image id",
            "inst",
            lambda d: d["images"].append(dict(d["images"][0])),
            r"images\[2\] \(id 139\): duplicate image id 139",
        ),
        (
            "image with no captions",
            "caps",
            lambda d: d.update(annotations=[a for a in d["annotations"] if a["image_id"] != 285]),
            r"1 image\(s\) of .*instances_x.json have no captions: ids 285",
        ),
    ],
)
def test_malformed_record_gets_one_error_naming_file_and_record(
    tmp_path, real_coco_style, case, where, breaker, expected
):
    ip, cp = _pair(tmp_path, *_break(real_coco_style, where, breaker))
    with pytest.raises(coco.CocoFormatError, match=expected) as err:
        coco.load_contexts(ip, cp)
    named = cp if where == "caps" else ip
    assert str(named) in str(err.value)


def test_invalid_json_names_the_file_and_line(tmp_path, real_coco_style):
    ip, cp = _pair(tmp_path, *real_coco_style)
    ip.write_text('{"images": [\n{"id": 1,,}]}')
    with pytest.raises(ValueError, match=r"instances_x.json: not valid JSON at line 2"):
        coco.load_contexts(ip, cp)


def test_box_overhang_within_rounding_is_clamped_not_rejected(tmp_path, real_coco_style):
    inst, caps = real_coco_style
    inst["annotations"][2]["bbox"] = [0.0, 50.0, 586.4, 590.3]
    ctx = coco.load_contexts(*_pair(tmp_path, inst, caps))[1]
    assert ctx.objects[0].box == (0.0, 0.078125, 1.0, 1.0)


def test_a_crowd_region_is_not_counted_as_one_object(tmp_path, real_coco_style):
    inst, caps = real_coco_style
    crowd = {"id": 4, "image_id": 139, "category_id": 1, "bbox": [10.0, 10.0, 300.0, 200.0], "iscrowd": 1}
    inst["annotations"].append(crowd)
    ctx = coco.load_contexts(*_pair(tmp_path, inst, caps))[0]
    assert [o.name for o in ctx.objects] == ["person", "chair"] and ctx.crowds == 1
    assert ctx.text().count("person:") == 1
