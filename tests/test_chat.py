"""The chat: any picture a person has read the way the model was trained (each odd file checked
against a conversion worked out here in numpy), greedy replies equal to the evaluation's, text
streamed piece by piece, ``<image>`` in the first turn only, reset, repeatable sampling, the
terminal command on a world scene, and the notebook widget built without a frontend."""

import io as stdio
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from llava_lite import cli, stages, world
from llava_lite import evaluate as ev
from llava_lite.chat import ChatSession, chat_widget, checkpoint_folder, scene_files
from llava_lite.config import WorldConfig, get_preset
from llava_lite.conversation import ASSISTANT, END, USER, get_template
from llava_lite.generate import greedy_replies, question_prompt, stop_id
from llava_lite.train import save_checkpoint
from llava_lite.vision import ImageReadError, load_image, pad_to_square, to_rgb

QUESTION = "Describe the image."
SEED = 7  # the projector of the model under test, not the preset's default (so loading it back matters)


# ------------------------------------------------------------------ fixtures
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture(scope="module")
def parts():
    """The tiny preset's shipped tower and language model under a projector drawn from SEED."""
    preset = get_preset("tiny")
    tower = stages.load_vision(preset.vision)
    lm, tok = stages.load_language(preset.language)
    model = stages.build_llava(preset, lm, tok, tower, seed=SEED).eval()
    return preset, tower, model, tok, get_template(preset.model.stage2_template, tok)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Two world test scenes written to disk as the world writes them."""
    root = tmp_path_factory.mktemp("world")
    world.generate(WorldConfig(splits={"test": 2}), root, progress=False)
    return scene_files(root / "test")


@pytest.fixture
def session(parts, scenes):
    preset, tower, model, tok, template = parts
    return ChatSession(model, tok, tower, template, image=next(iter(scenes.values())), max_new_tokens=12)


@pytest.fixture(scope="module")
def run_dir(parts, tmp_path_factory):
    """A stage-2 run folder holding the model under test, written by the training loop's own writer."""
    preset, _, model, _, _ = parts
    out = tmp_path_factory.mktemp("run")
    params = [p for p in model.parameters() if p.requires_grad]
    save_checkpoint(out, 1, model, torch.optim.AdamW(params), preset.stage2, keep=1)
    return out


# ------------------------------------------------------------------ any picture a person has
def _photo(h=24, w=40) -> np.ndarray:
    """A smooth, asymmetric RGB picture (smooth so a JPEG of it stays close)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)], -1).astype(np.uint8)


def _exif_rotated(tmp):
    """A JPEG stored on its side with EXIF orientation 6 (turn 90 degrees clockwise to view)."""
    upright = _photo()
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # as a camera held sideways stores it
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp / "sideways.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    raw = np.asarray(Image.open(path).convert("RGB"))  # the stored pixels, not turned
    return path, np.rot90(raw, k=-1), upright


def _gray16(tmp):
    """A 16-bit grayscale PNG that uses only part of its range: it must stay as bright as it is."""
    a = (np.arange(30 * 20).reshape(20, 30) * 67).astype(np.uint16)  # 0 .. 40133 of 65535
    path = tmp / "gray16.png"
    Image.fromarray(a).save(path)
    eight = np.rint(a.astype(np.float64) / 257).astype(np.uint8)  # 65535 -> 255
    return path, np.repeat(eight[..., None], 3, -1), None


def _rgb48(tmp):
    """A 16-bit-per-channel RGB PNG (scanners and raw converters write them), written byte by byte
    since Pillow writes none: 0..65535 must come out as 0..255."""
    a = np.random.default_rng(1).integers(0, 65536, (9, 13, 3)).astype(np.uint16)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in a)  # filter 0, big-endian samples
    header = struct.pack(">IIBBBBB", 13, 9, 16, 2, 0, 0, 0)  # width, height, 16 bits, truecolour
    path = tmp / "rgb48.png"
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )
    return path, np.rint(a / 257).astype(np.uint8), None


def _palette(tmp, fill):
    """A palette PNG whose index 0 is transparent: those pixels show the background."""
    idx = (np.arange(16 * 12).reshape(12, 16) % 4).astype(np.uint8)
    colours = np.array([[9, 9, 9], [250, 0, 0], [0, 250, 0], [0, 0, 250]], np.uint8)
    img = Image.fromarray(idx, "P")
    img.putpalette(colours.flatten().tolist() + [0] * (768 - 12))
    path = tmp / "palette.png"
    img.save(path, transparency=0)
    ref = colours[idx]
    ref[idx == 0] = fill
    return path, ref, None


def _rgba(tmp, fill):
    """An RGBA PNG with alpha running from 0 to 255 across it."""
    rgb = _photo(12, 18)
    alpha = np.tile(np.linspace(0, 255, 18).round().astype(np.uint8), (12, 1))
    path = tmp / "rgba.png"
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)
    a = alpha[..., None].astype(np.float64) / 255
    ref = np.rint(rgb * a + np.array(fill) * (1 - a)).astype(np.uint8)
    return path, ref, None


def _cmyk(tmp):
    """A CMYK JPEG (print workflows write them)."""
    rgb = _photo()
    cmyk = np.dstack([255 - rgb, np.zeros(rgb.shape[:2], np.uint8)])  # C, M, Y = 255 - R, G, B; no black
    path = tmp / "print.jpg"
    Image.fromarray(cmyk, "CMYK").save(path, quality=95)
    stored = np.asarray(Image.open(path)).astype(np.float64)  # the decoded C, M, Y, K
    k = stored[..., 3:]
    ref = np.rint((255 - stored[..., :3]) * (255 - k) / 255).astype(np.uint8)
    return path, ref, rgb


def _gray(tmp):
    a = _photo()[..., 0]
    path = tmp / "gray.png"
    Image.fromarray(a, "L").save(path)
    return path, np.repeat(a[..., None], 3, -1), None


def _narrow(tmp):
    """A 7 x 50 strip: odd sides, an aspect of 1:7."""
    rgb = np.random.default_rng(0).integers(0, 256, (50, 7, 3), dtype=np.uint8)
    path = tmp / "strip.png"
    Image.fromarray(rgb).save(path)
    return path, rgb, None


ODD_FILES = {
    "exif_rotated_jpeg": lambda tmp, fill: _exif_rotated(tmp),
    "gray16_png": lambda tmp, fill: _gray16(tmp),
    "rgb48_png": lambda tmp, fill: _rgb48(tmp),
    "palette_transparent_png": _palette,
    "rgba_png": _rgba,
    "cmyk_jpeg": lambda tmp, fill: _cmyk(tmp),
    "grayscale_png": lambda tmp, fill: _gray(tmp),
    "narrow_odd_aspect_png": lambda tmp, fill: _narrow(tmp),
}
# a rounding step apart (Pillow keeps a 16-bit sample's high byte, not value / 257); every other file is exact
TOLERANCE = {"rgba_png": 1, "cmyk_jpeg": 1, "rgb48_png": 1}


@pytest.mark.parametrize("kind", list(ODD_FILES))
def test_an_odd_image_file_reads_as_its_reference_rgb_and_the_chat_sees_exactly_that(kind, tmp_path, session):
    tower = session.tower
    path, ref, source = ODD_FILES[kind](tmp_path, tower.fill)
    got = np.asarray(to_rgb(load_image(path), tower.fill))
    assert got.shape == ref.shape, f"{kind}: {got.shape} != {ref.shape}"
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= TOLERANCE.get(kind, 0), kind
    if source is not None:  # a JPEG: close to the picture it was made from, too
        assert np.abs(got.astype(int) - source.astype(int)).mean() < 3, kind
    session.set_image(path)
    assert np.array_equal(np.asarray(session.image), got)
    expected = tower.encode([Image.fromarray(got)])  # the tower's route from an RGB picture
    torch.testing.assert_close(session.features, expected, rtol=0, atol=0)


def test_a_narrow_picture_is_padded_to_a_square_with_the_towers_mean_colour(tmp_path, session):
    path, rgb, _ = _narrow(tmp_path)
    session.set_image(path)
    ref = np.empty((50, 50, 3), np.uint8)
    ref[:] = session.tower.fill
    ref[:, 21:28] = rgb  # (50 - 7) // 2 = 21 columns of padding on the left
    assert np.array_equal(np.asarray(session.square()), ref)
    assert np.array_equal(np.asarray(pad_to_square(Image.fromarray(rgb), session.tower.fill)), ref)


def test_an_unreadable_file_is_an_error_naming_it_in_the_session_and_the_command(
    tmp_path, session, run_dir, caplog, monkeypatch
):
    garbage = tmp_path / "holiday photo.jpg"
    garbage.write_bytes(b"GIF89a but not really an image")
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path in (garbage, truncated, tmp_path / "missing.png"):
        with pytest.raises(ImageReadError, match=path.name):
            session.set_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 40 x 40 is now a decompression bomb
    with pytest.raises(ImageReadError, match="good.png: refused as a possible decompression bomb"):
        session.set_image(good)
    monkeypatch.undo()
    rc = cli.main(["chat", "--checkpoint", str(run_dir), "--image", str(garbage), "--question", QUESTION])
    assert rc == 1 and "holiday photo.jpg: cannot decode image" in caplog.text


# ------------------------------------------------------------------ the conversation
def test_a_greedy_chat_reply_equals_the_evaluations_greedy_reply_and_streams_piece_by_piece(parts, session):
    _, _, model, tok, template = parts
    item = ev.Item("s", "scene", "count", QUESTION, "")
    evaluated = ev.ask_llava(model, template, tok, [item], lambda _: session.features[0], batch_size=1)[0]
    assert session.ask(QUESTION, max_new_tokens=4) == evaluated  # the evaluation asks for 4 tokens
    session.reset()
    pieces = []
    reply = session.ask(QUESTION, on_token=pieces.append)
    expected = greedy_replies(
        model.generate,
        [question_prompt(model, template, QUESTION)],
        tok.pad_token_id,
        stop_id(tok),
        lambda t: tok.decode(t, skip_special_tokens=True),
        max_new_tokens=12,
        extras=lambda idx: {"image_features": session.features},
    )
    assert [reply] == expected and len(reply) > len(evaluated)
    assert "".join(pieces) == reply and len(pieces) > 1  # streamed, not handed over at the end
    session.reset()
    pieces = []
    sampled = session.ask(QUESTION, temperature=1.5, seed=0, max_new_tokens=16, on_token=pieces.append)
    assert "".join(pieces) == sampled and len(pieces) > 1


def test_the_image_stands_in_the_first_turn_only_and_later_turns_extend_the_prompt(parts, session):
    _, tower, model, tok, _ = parts
    first = session.ask(QUESTION)
    p1 = session.prompt()
    second = session.ask("What colour is the circle?")
    p2 = session.prompt()
    assert p2.ids[: len(p1.ids)] == p1.ids  # what was read before is read again, unchanged
    slots = [i for i, t in enumerate(p2.ids) if t == model.image_token_id]
    user, end = tok.convert_tokens_to_ids(USER), tok.convert_tokens_to_ids(END)
    assert len(slots) == tower.num_patches == p2.image_slots
    assert p2.ids[0] == user and slots == list(range(1, 1 + tower.num_patches))  # at the start of turn 1
    assert slots[-1] < p2.ids.index(end)  # ... before turn 1 ends
    assert p2.text.count("<image>") == 1 and p2.text.startswith(f"{USER}<image>")
    assert p2.text.endswith(f"What colour is the circle?{END}{ASSISTANT}")
    # the reply is read again as a trained answer is: its words after the assistant's opening, no extra space
    assert f"{ASSISTANT} {first.strip()}{END}" in p2.text and f"{ASSISTANT}  " not in p2.text
    assert session.history == [(QUESTION, first.strip()), ("What colour is the circle?", second.strip())]
    # the second reply is the evaluation's greedy reply to this very prompt
    again = greedy_replies(
        model.generate,
        [p2.ids],
        tok.pad_token_id,
        stop_id(tok),
        lambda t: tok.decode(t, skip_special_tokens=True),
        max_new_tokens=12,
        extras=lambda idx: {"image_features": session.features},
    )
    assert again == [second]


def test_reset_forgets_the_turns_and_keeps_the_picture(session):
    first = session.ask(QUESTION)
    fresh_prompt = session.prompt().ids
    session.ask("And the circle?")
    features = session.features.clone()
    session.reset()
    assert session.turns == [] and session.prompt() is None and session.history == []
    assert torch.equal(session.features, features)
    assert session.prompt(QUESTION).ids == fresh_prompt  # what asking would send, before asking
    assert session.ask(QUESTION) == first and session.prompt().ids == fresh_prompt


def test_sampling_is_repeatable_with_a_seed_varies_across_seeds_and_narrows_to_greedy(session):
    greedy = session.ask(QUESTION, max_new_tokens=6)
    state = torch.get_rng_state()
    samples = []
    for seed in range(4):
        session.reset()
        samples.append(session.ask(QUESTION, temperature=1.5, seed=seed, max_new_tokens=6))
    session.reset()
    assert session.ask(QUESTION, temperature=1.5, seed=2, max_new_tokens=6) == samples[2]  # same seed, same reply
    assert len(set(samples)) > 1 and greedy not in samples  # sampled, not greedy
    for seed in range(2):  # a nucleus of one token is the most likely token: greedy
        session.reset()
        assert session.ask(QUESTION, temperature=1.0, top_p=1e-6, seed=seed, max_new_tokens=6) == greedy
    assert torch.equal(torch.get_rng_state(), state)  # seeded sampling leaves the global generator alone


def test_bad_sampling_settings_and_an_empty_question_are_refused(session):
    with pytest.raises(ValueError, match="temperature"):
        session.ask(QUESTION, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        session.ask(QUESTION, temperature=1, top_p=0)
    with pytest.raises(ValueError, match="empty question"):
        session.ask(" <image> ")
    assert session.turns == []


# ------------------------------------------------------------------ the checkpoint and the terminal
def test_a_session_from_a_run_folder_answers_as_the_model_that_was_saved(run_dir, scenes, session):
    assert checkpoint_folder(run_dir).name == "checkpoint-1"
    loaded = ChatSession.from_checkpoint(run_dir, "tiny", image=next(iter(scenes.values())), max_new_tokens=12)
    assert loaded.ask(QUESTION) == session.ask(QUESTION)
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        checkpoint_folder(run_dir.parent)


def test_the_chat_command_answers_a_question_about_a_world_scene(run_dir, scenes, parts, capsys):
    _, tower, model, tok, template = parts
    scene = next(iter(scenes.values()))
    args = ["chat", "--checkpoint", str(run_dir), "--image", str(scene), "--question", QUESTION]
    assert cli.main(args + ["--max-new-tokens", "12"]) == 0
    expected = ChatSession(model, tok, tower, template, image=scene, max_new_tokens=12).ask(QUESTION)
    assert capsys.readouterr().out == f"llava> {expected.lstrip()}\n"


def test_the_chat_command_holds_a_conversation_on_stdin(run_dir, scenes, monkeypatch, capsys):
    scene = next(iter(scenes.values()))
    lines = f"{QUESTION}\n/prompt\n/reset\n/prompt\nWhat colour is the circle?\n/quit\nnever read\n"
    monkeypatch.setattr("sys.stdin", stdio.StringIO(lines))
    assert cli.main(["chat", "--checkpoint", str(run_dir), "--image", str(scene), "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("llava> ") == 2 and out.count("you> ") == 6
    assert f"<image> \n Describe the image.{END}{ASSISTANT}" in out and "patch slots" in out
    assert "(conversation reset)\n" in out and "(nothing asked yet)" in out and "never read" not in out


# ------------------------------------------------------------------ the notebook widget
def test_the_widget_builds_without_a_frontend_and_its_controls_drive_the_session(session, scenes, tmp_path):
    widget = chat_widget(session, scenes)
    assert list(widget.scene.options) == list(scenes) and len(widget.ui.children) == 6
    name = list(scenes)[1]
    widget.scene.value = name  # choosing a scene is what the drop-down does
    assert session.image_name == name and bytes(widget.picture.value).startswith(b"\x89PNG")
    widget.question.value = QUESTION
    widget.max_tokens.value = 6
    widget.send_button.click()  # the send button, as a person presses it
    clicked = session.history[0][1]
    streamed = "".join(o["text"] for o in widget.log.outputs)
    session.reset()
    reply = session.ask(QUESTION, max_new_tokens=6)  # what the session's API answers
    assert clicked == reply.strip() and f"you: {QUESTION}\nllava: {reply.lstrip()}\n" in streamed
    widget.show_prompt.value = True
    assert session.prompt().text in widget.prompt_view.outputs[0]["text"]
    assert widget.send("What colour is the circle?").strip() == session.history[1][1]  # a script: the same path
    widget.reset_button.click()
    assert session.turns == [] and widget.log.outputs == ()
    photo = stdio.BytesIO()
    Image.fromarray(_photo()).save(photo, "PNG")
    widget._on_upload(({"name": "mine.png", "content": memoryview(photo.getvalue())},))  # ipywidgets 8's value
    assert session.image_name == "mine.png" and session.image.size == (40, 24)
    widget._on_upload({"old.png": {"content": photo.getvalue(), "metadata": {}}})  # ipywidgets 7's (Colab's)
    assert session.image_name == "old.png"
    widget.use_file("broken.jpg", b"not a picture")
    assert "broken.jpg: cannot decode image" in "".join(o["text"] for o in widget.log.outputs)
    assert session.image_name == "old.png"  # the last good picture stays
