"""Settings and presets: a checkpoint's config checked against the model it is loaded into (both
values named the right way round), and an unknown preset refused before any work."""

import pytest

from llava_lite.cli import main
from llava_lite.config import LlavaConfig


def _cfg(**changes) -> LlavaConfig:
    base = dict(vision_key="tower-a", vision_dim=12, num_image_tokens=4, lm_name="tiny-lm", lm_dim=32, image_token_id=7)
    return LlavaConfig(**{**base, **changes})


def test_check_compatible_names_the_checkpoints_value_then_this_models():
    saved, model = _cfg(vision_key="tower-of-the-checkpoint"), _cfg(vision_key="tower-of-this-model")
    with pytest.raises(
        ValueError,
        match=r"ckpt was made for vision_key=.tower-of-the-checkpoint., "
        r"but this model has vision_key=.tower-of-this-model.",
    ):
        saved.check_compatible(model, "ckpt")


@pytest.mark.parametrize(("name", "value"), [("lm_name", "other-lm"), ("image_token_id", 8)])
def test_a_checkpoint_of_another_lm_of_the_same_width_is_refused(name, value):
    with pytest.raises(ValueError, match=rf"made for {name}="):
        _cfg(**{name: value}).check_compatible(_cfg(), "stage-1 checkpoint")


@pytest.mark.parametrize(
    "argv",
    [
        ["world", "--preset", "nope"],
        ["train", "--stage", "1", "--preset", "nope"],
        ["backbones", "lm", "--preset", "nope", "--out", "x"],
        ["tutorial", "--preset", "nope"],
    ],
)
def test_an_unknown_preset_is_refused_by_every_command_before_any_work(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert "unknown preset 'nope'; expected one of ['colab', 'full', 'tiny']" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
