"""The vision tower: layer selection, preprocessing of odd images, errors that name the file,
and the shipped tiny CLIP still meeting its metrics when measured afresh."""

from __future__ import annotations

import io as stdio
import json

import numpy as np
import pytest
import torch
from PIL import Image

from llava_lite.config import WorldConfig
from llava_lite.probes import shape_colour_probe
from llava_lite.retrieval import heldout_descriptions, heldout_scenes, load_clip, retrieval_report
from llava_lite.vision import SHIPPED, ImageReadError, VisionTower, load_image, normalise

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 3, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 16, "width": 32, "heads": 2, "layers": 1},
}


def tower(**kw) -> VisionTower:
    return VisionTower.from_config(TINY_CFG, seed=0, **kw)


def block_output(t: VisionTower, pixels: torch.Tensor, block: int) -> torch.Tensor:
    """What a forward hook on ``resblocks[block]`` sees when the whole open_clip tower runs."""
    seen = {}
    handle = t.visual.transformer.resblocks[block].register_forward_hook(lambda m, i, o: seen.setdefault("x", o))
    with torch.no_grad():
        t.visual(pixels)
    handle.remove()
    return seen["x"]  # [B, 1 + P, W]


def test_default_layer_is_penultimate_block_output_without_cls_as_a_hook_sees_it():
    t = tower()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = t(x)
    assert got.shape == (2, 16, 32) and t.num_patches == 16 and t.width == 32
    torch.testing.assert_close(got, block_output(t, x, -2)[:, 1:])
    assert not torch.allclose(got, block_output(t, x, -1)[:, 1:])  # really not the last block


def test_last_layer_with_cls_matches_hook_on_last_block():
    t = tower(layer=-1, keep_cls=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = t(x)
    assert got.shape == (2, 17, 32) and t.num_patches == 17
    torch.testing.assert_close(got, block_output(t, x, -1))


def test_last_layer_cls_token_through_ln_post_and_proj_is_clips_image_embedding():
    t = tower(layer=-1, keep_cls=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        cls_tok = t(x)[:, 0]  # [B, W]
        torch.testing.assert_close(t.visual.ln_post(cls_tok) @ t.visual.proj, t.visual(x))


def test_cache_key_changes_with_layer_cls_and_weights():
    keys = {
        tower().cache_key,
        tower(layer=-1).cache_key,
        tower(keep_cls=True).cache_key,
        VisionTower.from_config(TINY_CFG, seed=1).cache_key,
    }
    assert len(keys) == 4
    assert tower().cache_key == tower().cache_key  # stable across loads


def test_layer_out_of_range_is_refused_with_the_block_count():
    with pytest.raises(ValueError, match="3 blocks"):
        tower(layer=-4)


def _rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (40, 70, 3), dtype=np.uint8)


def _rgba() -> Image.Image:
    img = Image.fromarray(_rgb()).convert("RGBA")
    img.putalpha(128)
    return img


ODD_IMAGES = {
    "grayscale": lambda: Image.fromarray(_rgb()[..., 0]),
    "rgba": _rgba,
    "palette": lambda: Image.fromarray(_rgb()).convert("P"),
    "one_pixel": lambda: Image.new("RGB", (1, 1), (200, 10, 10)),
    "huge": lambda: Image.new("RGB", (4000, 3000), (10, 200, 10)),
    "tall": lambda: Image.fromarray(_rgb()).transpose(Image.Transpose.ROTATE_90),
    "16bit": lambda: Image.fromarray(_rgb()[..., 0].astype(np.uint16) * 250),
    "cmyk": lambda: Image.fromarray(_rgb()).convert("CMYK"),
}


@pytest.mark.parametrize("kind", list(ODD_IMAGES))
def test_odd_images_become_a_normalised_square_batch(kind):
    img = ODD_IMAGES[kind]()
    feats = tower().encode([img])
    assert feats.shape == (1, 16, 32) and torch.isfinite(feats).all()


def test_non_square_image_is_padded_not_cropped():
    t = tower()
    img = Image.new("RGB", (64, 16), (255, 0, 0))  # a red strip: padding adds the mean colour above and below
    x = t.preprocess(img)  # [3, 32, 32]
    red = torch.tensor([255, 0, 0]).view(3, 1) / 255
    red = (red - t.mean.view(3, 1)) / t.std.view(3, 1)
    row = x[:, 16, :]  # the middle row is all red strip
    torch.testing.assert_close(row, red.expand_as(row), atol=0.05, rtol=0)
    assert torch.allclose(x[:, 0, :], torch.zeros_like(x[:, 0, :]), atol=0.02)  # mean colour = 0 once normalised


def test_normalise_scales_pixels_to_unit_range_then_subtracts_the_mean_over_the_std():
    x = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    mean, std = [0.2, 0.5, 0.7], [0.25, 0.3, 0.1]
    expected = (x.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    got = normalise(x, mean, std)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(normalise(x[0], torch.tensor(mean), torch.tensor(std)), expected[0], rtol=0, atol=1e-6)


def test_preprocess_of_a_square_image_at_the_towers_size_is_normalise_of_its_pixels():
    t = tower()
    x = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    img = Image.fromarray(x.permute(1, 2, 0).numpy())
    torch.testing.assert_close(t.preprocess(img), normalise(x, t.mean, t.std), rtol=0, atol=0)


@pytest.mark.parametrize("batch_size", [2, 250])
def test_encode_of_a_uint8_tensor_equals_encode_of_the_same_images_and_one_at_a_time(batch_size):
    t = tower()
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in x]
    from_tensor = t.encode(x, batch_size=batch_size)
    assert from_tensor.shape == (5, 16, 32) and not from_tensor.requires_grad
    torch.testing.assert_close(from_tensor, t.encode(images, batch_size=batch_size))
    one_by_one = torch.cat([t.encode(x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(from_tensor, one_by_one)
    with torch.no_grad():
        torch.testing.assert_close(from_tensor, t(normalise(x, t.mean, t.std)))


def test_unreadable_files_raise_errors_naming_the_file(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image")
    for path in (truncated, garbage, tmp_path / "missing.png"):
        with pytest.raises(ImageReadError, match=path.name):
            load_image(path)
        with pytest.raises(ImageReadError, match=path.name):
            tower().encode([path])


def test_truncated_jpeg_names_the_file(tmp_path):
    buf = stdio.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[:600])
    with pytest.raises(ImageReadError, match="cut.jpg"):
        load_image(path)


# ------------------------------------------------------------------ the shipped tiny CLIP
@pytest.fixture(scope="module")
def shipped_clip_measured():
    """The shipped tiny CLIP measured afresh: retrieval and probes on 1000 scenes it never saw."""
    folder = SHIPPED["tiny-clip"]
    card = json.loads((folder / "metrics.json").read_text())
    world_cfg = WorldConfig(**card["config"]["world"])
    # a split name never used before: fresh scenes, disjoint from every split the CLIP saw
    name = "test-vision-heldout"
    images, caps, objs = heldout_scenes(world_cfg, 1000, name=name)
    model, tokenizer = load_clip(folder)
    t = VisionTower.load("tiny-clip")
    report = retrieval_report(model, tokenizer, images, caps, heldout_descriptions(objs, name))
    return card, report, shape_colour_probe(t, images, objs), t


@pytest.mark.slow
def test_shipped_tiny_clip_loads_and_measures_what_its_card_says(shipped_clip_measured):
    card, r, probe, t = shipped_clip_measured
    assert t.layer == -2 and t.num_patches == 64
    # far above chance (1 in 100), and no worse than the numbers committed beside the weights
    for way, key in (
        ("captions", "retrieval"),
        ("scenes", "retrieval_scenes"),
        ("descriptions", "retrieval_descriptions"),
    ):
        assert r[way]["r@1"] >= max(0.2, card[key]["r@1"] - 0.05), (way, r[way], card[key])
    assert probe["shape"]["accuracy"] >= card["probe_layer-2"]["shape"]["accuracy"] - 0.03, probe
    assert probe["colour"]["accuracy"] >= max(0.85, card["probe_layer-2"]["colour"]["accuracy"] - 0.03), probe


@pytest.mark.slow
def test_shipped_tiny_clip_features_carry_shape(shipped_clip_measured):
    """The tiny CLIP's target: a linear probe on pooled patch features finds the shapes present >= 90%."""
    _, _, probe, _ = shipped_clip_measured
    assert probe["shape"]["accuracy"] >= 0.9, probe
    assert probe["shape"]["accuracy"] > probe["shape"]["majority"] + 0.15, probe


@pytest.mark.slow
def test_shipped_tiny_clip_meets_the_retrieval_target(shipped_clip_measured):
    """The tiny CLIP's target: recall@1 >= 0.8 among 100 held-out scenes, with texts that tell the scenes
    apart: each scene's description (every object named), and all five world captions of each
    scene ranked together (the caption datasets' protocol). One world caption at a time is not
    counted: too many of them fit several scenes (the card's truth-reader row)."""
    _, r, _, _ = shipped_clip_measured
    assert r["descriptions"]["r@1"] >= 0.8, r
    assert r["scenes"]["r@1"] >= 0.8, r


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="the shipped tiny CLIP's pooled colour probe is ~0.89 (data/pretrained/tiny-clip/LAB.md); "
    "strict, so reaching 0.9 turns this into a failure that asks to drop the mark",
)
def test_shipped_tiny_clip_pooled_features_tell_the_colours_present(shipped_clip_measured):
    _, _, probe, _ = shipped_clip_measured
    assert probe["colour"]["accuracy"] >= 0.9, probe


def test_an_image_over_pils_pixel_limit_is_refused_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels is over twice the limit: a bomb to PIL
    with pytest.raises(ImageReadError, match=r"huge\.png: refused as a possible decompression bomb"):
        load_image(path)
