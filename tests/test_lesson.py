"""``lesson.setup``: one call prepares what a notebook needs, and a second call reuses it."""

import pytest

from llava_lite import lesson
from llava_lite.features import cache_folder
from llava_lite.paths import Layout

SPLITS = {"pretrain": 8, "train": 16, "val": 4, "test": 4}


def _mtimes(root):
    return {p: p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_LITE_OUTPUTS", str(tmp_path))
    return tmp_path


def test_setup_writes_the_world_the_asked_data_and_features_and_builds_a_model_on_the_tower(outputs):
    got = lesson.setup("tiny", SPLITS, instruct_splits=("train",), feature_splits=("train",), model=True)
    layout = Layout(outputs / "tiny")
    assert got.layout == layout and got.cfg.world.splits == SPLITS
    for split, n in SPLITS.items():
        assert layout.instances(split).exists() and len(got.contexts(split)) == n
    assert (layout.instruct / "train.json").exists() and not (layout.instruct / "val.json").exists()
    assert set(got.features) == {"train"} and len(got.features["train"]) == 16
    assert cache_folder(layout.features, got.tower, "train").is_dir()
    assert got.model.config.num_image_tokens == got.tower.num_patches
    assert got.model.config.vision_key == got.tower.cache_key == got.features["train"].cache_key
    assert got.tokenizer is not None and got.model.image_token_id == got.tokenizer.convert_tokens_to_ids("<image>")

    before = _mtimes(outputs)
    again = lesson.setup("tiny", SPLITS, instruct_splits=("train",), feature_splits=("train",), model=True)
    assert _mtimes(outputs) == before  # every file reused as it was: the world, the data, the feature cache
    assert len(again.features["train"]) == 16


def test_setup_builds_only_what_is_asked(outputs):
    got = lesson.setup("tiny", SPLITS)
    assert got.tower is None and got.model is None and got.features == {}
    assert not (Layout(outputs / "tiny").instruct / "train.json").exists()
    assert Layout(outputs / "tiny").instances("test").exists()
