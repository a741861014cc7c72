"""Chatting with a trained LLaVA about one picture: the session that the notebook's widget and
``llava-lite chat`` both drive.

A :class:`ChatSession` holds the model, its tokenizer and stage-2 template, the frozen vision
tower and the patch features of the picture under discussion, and the turns so far. Each
question is one more human turn; ``<image>`` stands in the first turn only, as in LLaVA's
instruction data, grown to one slot per patch token. The reply streams token by token to a
callback, greedy by default or sampled (temperature, top-p). Within a reply the model's KV cache
carries the context; at each new question the whole conversation is read again, so what the
model read is always exactly :meth:`ChatSession.prompt`.

The picture goes through the tower's one image route (:mod:`llava_lite.vision`): read upright by
its EXIF orientation, any mode made RGB (transparency over the tower's mean colour), padded to a
square, resized and normalised, the way every training image was.
"""

from __future__ import annotations

import io as stdio
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from PIL import Image

from . import stages
from .config import Preset, get_preset
from .conversation import IMAGE_TOKEN, Template, get_template
from .generate import conversation_prompt, evaluating, stop_id, stream_reply
from .model import LlavaLite
from .paths import Layout
from .train import latest_checkpoint
from .vision import VisionTower, load_image, pad_to_square, to_rgb

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class Prompt:
    """What the model read before a reply. ``ids`` are the exact tokens, the image's slots grown
    to one per patch token; ``text`` is the same tokens decoded, the image's slots written once
    as ``<image>`` (``image_slots`` of them)."""

    ids: list[int]
    text: str
    image_slots: int

    def __str__(self) -> str:
        return self.text

    def summary(self) -> str:
        return f"{len(self.ids)} tokens; <image> stands for {self.image_slots} patch slots"


def checkpoint_folder(path: str | os.PathLike) -> Path:
    """A checkpoint folder (``trainable.safetensors``), or a run folder's latest checkpoint."""
    path = Path(path)
    if (path / "trainable.safetensors").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None or not (latest / "trainable.safetensors").is_file():
        raise FileNotFoundError(
            f"{path}: not a checkpoint (expected trainable.safetensors) nor a run folder (expected latest.json "
            "pointing at one); pass a folder written by `llava-lite train`"
        )
    return latest


class ChatSession:
    """A conversation with a LLaVA model about one picture.

    ``ask(question)`` answers and remembers; ``prompt()`` is what the model read; ``reset()``
    forgets the turns and keeps the picture; ``set_image(path_or_pil)`` changes the picture and
    resets. The widget and the terminal chat call only these."""

    def __init__(
        self,
        model: LlavaLite,
        tokenizer,
        tower: VisionTower,
        template: Template,
        image: str | os.PathLike | Image.Image | None = None,
        max_new_tokens: int = 64,
    ):
        if model.config.vision_key != tower.cache_key:
            raise ValueError(
                f"the model was trained on features of {model.config.vision_key!r}, this tower is {tower.cache_key!r}"
            )
        self.model, self.tokenizer, self.tower, self.template = model, tokenizer, tower, template
        self.max_new_tokens = max_new_tokens
        self.stop_id = stop_id(tokenizer)
        self.device = next(model.parameters()).device
        self.turns: list[dict] = []  # LLaVA turns: {"from": "human" | "gpt", "value": ...}
        self.image: Image.Image | None = None  # the picture as RGB, before the square pad
        self.image_name = ""
        self.features: torch.Tensor | None = None  # [1, P, Dv] the tower's patch tokens of the picture
        self.last_prompt: Prompt | None = None
        if image is not None:
            self.set_image(image)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike,
        preset: str | Preset = "tiny",
        image: str | os.PathLike | Image.Image | None = None,
        device: str | torch.device = "cpu",
        max_new_tokens: int = 64,
    ) -> ChatSession:
        """A session over a trained stage (a checkpoint folder or a run folder: its latest)."""
        preset = get_preset(preset) if isinstance(preset, str) else preset
        folder = checkpoint_folder(checkpoint)
        tower = stages.load_vision(preset.vision).to(device)
        model, tokenizer = stages.load_stage(preset, folder, tower)
        template = get_template(preset.model.stage2_template, tokenizer)
        log.info("chat with %s (%s template)", folder, template.name)
        return cls(model.to(device).eval(), tokenizer, tower, template, image, max_new_tokens)

    # ------------------------------------------------------------------ the picture
    def set_image(self, image: str | os.PathLike | Image.Image, name: str | None = None) -> None:
        """Discuss ``image`` (a file of any format the tower reads, or a PIL image) from a fresh start."""
        pil = image if isinstance(image, Image.Image) else load_image(image)  # a bad file: error naming it
        self.image = to_rgb(pil, self.tower.fill)
        self.image_name = name or (str(image) if not isinstance(image, Image.Image) else "an image")
        self.features = self.tower.encode([self.image]).to(self.device)  # [1, P, Dv]
        self.reset()

    def square(self) -> Image.Image | None:
        """The picture as the tower sees it before resizing: padded to a square with the mean colour."""
        return None if self.image is None else pad_to_square(self.image, self.tower.fill)

    # ------------------------------------------------------------------ the conversation
    def reset(self) -> None:
        """Forget every turn (the picture stays)."""
        self.turns = []
        self.last_prompt = None

    @property
    def history(self) -> list[tuple[str, str]]:
        """``(question, reply)`` pairs so far as the model reads them again: the question without
        ``<image>``, the reply stripped of surrounding spaces."""
        qs = [t["value"].replace(IMAGE_TOKEN, "").strip() for t in self.turns[::2]]
        return list(zip(qs, [t["value"] for t in self.turns[1::2]]))

    def _turns_asking(self, question: str) -> list[dict]:
        question = question.replace(IMAGE_TOKEN, "").strip()  # the picture has one place, the first turn
        if not question:
            raise ValueError("an empty question: type something to ask about the picture")
        value = f"{IMAGE_TOKEN}\n{question}" if not self.turns else question
        return self.turns + [{"from": "human", "value": value}]

    def _prompt_of(self, turns: list[dict]) -> Prompt:
        ids = conversation_prompt(self.model, self.template, turns, "chat")
        text = self.tokenizer.decode(self.template.prompt(turns, "chat"), skip_special_tokens=False)
        return Prompt(ids, text, ids.count(self.model.image_token_id))

    def prompt(self, question: str | None = None) -> Prompt | None:
        """The exact prompt of the last reply, or the one asking ``question`` next would give."""
        return self._prompt_of(self._turns_asking(question)) if question is not None else self.last_prompt

    def ask(
        self,
        question: str,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        on_token: Callable[[str], None] | None = None,
    ) -> str:
        """The model's reply to ``question``, remembered as the next turn. ``on_token`` receives the
        reply's text piece by piece as tokens arrive (the pieces add up to the reply). Greedy at
        ``temperature`` 0; above it, sampled with nucleus ``top_p``, repeatable with ``seed``."""
        if self.features is None:
            raise ValueError("no picture yet: call set_image(path) first")
        turns = self._turns_asking(question)
        prompt = self._prompt_of(turns)
        new = max_new_tokens or self.max_new_tokens
        limit = getattr(self.model.lm.config, "max_position_embeddings", None)
        if limit and len(prompt.ids) + new > limit:
            raise ValueError(
                f"the conversation is {len(prompt.ids)} tokens and the reply may add {new}, but the model reads "
                f"at most {limit}: reset the conversation"
            )
        with evaluating(self.model):
            reply = stream_reply(
                self.model.generate,
                prompt.ids,
                self.stop_id,
                lambda t: self.tokenizer.decode(t, skip_special_tokens=True),
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=new,
                seed=seed,
                on_text=on_token,
                pad_id=self.tokenizer.pad_token_id,
                device=self.device,
                image_features=self.features,
            )
        # kept as the instruction data keeps answers, without the space a first token may carry:
        # read again next turn, it is then tokenised as the answers the model was trained on
        self.turns = turns + [{"from": "gpt", "value": reply.strip()}]
        self.last_prompt = prompt
        return reply


# ------------------------------------------------------------------ scenes to pick from
def scene_files(folder: str | os.PathLike, limit: int | None = 12) -> dict[str, Path]:
    """``{file name: path}`` of the first ``limit`` images of a folder (a split's scenes)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such image folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return {p.name: p for p in files[:limit]}


def split_scenes(preset: str = "tiny", split: str = "test", limit: int | None = 12) -> dict[str, Path]:
    """The preset's ``split`` scenes on disk (the test split's by default), for the widget's drop-down."""
    return scene_files(Layout.for_preset(preset).images(split), limit)


# ------------------------------------------------------------------ the terminal
def _after_leading_space(write: Callable[[str], None]) -> Callable[[str], None]:
    """``write`` for streamed pieces, less the space a reply's first token may open with."""
    started = False

    def on_token(piece: str) -> None:
        nonlocal started
        piece = piece if started else piece.lstrip()
        started = started or bool(piece)
        if piece:
            write(piece)

    return on_token


def terminal(
    session: ChatSession,
    question: str | None = None,
    *,
    stdin: TextIO | None = None,
    out: TextIO | None = None,
    **sampling,
) -> int:
    """``llava-lite chat``: one ``question`` answered, or a conversation read from ``stdin``
    (``/reset``, ``/prompt``, ``/quit``), tokens written to ``out`` as they arrive."""
    stdin, out = stdin or sys.stdin, out or sys.stdout

    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    def answer(q: str) -> None:
        out.write("llava> ")
        session.ask(q, on_token=_after_leading_space(write), **sampling)
        out.write("\n")
        out.flush()

    if question is not None:
        answer(question)
        return 0
    out.write(f"talking about {session.image_name} (/reset starts over, /prompt shows what the model read, /quit)\n")
    while True:
        out.write("you> ")
        out.flush()
        line = stdin.readline()
        if not line:  # end of input
            out.write("\n")
            return 0
        line = line.strip()
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            session.reset()
            out.write("(conversation reset)\n")
        elif line == "/prompt":
            p = session.prompt()
            out.write("(nothing asked yet)\n" if p is None else f"{p.text}\n({p.summary()})\n")
        elif line:
            try:
                answer(line)
            except ValueError as e:  # an over-long conversation: say so and keep the chat open
                out.write(f"\n({e})\n")


# ------------------------------------------------------------------ the notebook widget
def _png(img: Image.Image, side: int) -> bytes:
    thumb = img.copy()
    thumb.thumbnail((side, side))
    buf = stdio.BytesIO()
    thumb.save(buf, "PNG")
    return buf.getvalue()


def _uploaded(value) -> tuple[str, bytes] | None:
    """``(name, bytes)`` of a FileUpload's value (a tuple of dicts in ipywidgets 8, a dict by name in 7)."""
    if not value:
        return None
    if isinstance(value, Mapping):  # ipywidgets 7 (Colab's): {name: {"content": bytes, "metadata": ...}}
        name, item = next(iter(value.items()))
        return name, bytes(item["content"])
    item = value[0]
    return item["name"], bytes(item["content"])


class ChatWidget:
    """The notebook chat: a scene drop-down or an upload, a question box, send and reset, the
    sampling controls and the prompt on demand. Every control calls a method here, and each
    method calls the session's API, so a script (papermill) drives the same path: ``w.pick(name)``,
    ``w.send("How many circles?")``, ``w.reset()``."""

    def __init__(self, session: ChatSession, scenes: Mapping[str, str | os.PathLike] | Sequence | None = None):
        import ipywidgets as w  # the notebook's widget library: the session and the terminal chat need none of it

        self.session = session
        if scenes is not None and not isinstance(scenes, Mapping):
            scenes = {Path(p).name: p for p in scenes}
        self.scenes = dict(scenes or {})
        self._upload_dir = Path(tempfile.mkdtemp(prefix="llava-lite-chat-"))
        self.scene = w.Dropdown(options=list(self.scenes), value=None, description="scene")
        self.upload = w.FileUpload(accept="image/*", multiple=False, description="upload")
        self.picture = w.Image(format="png", layout=w.Layout(width="160px", height="160px"))
        self.question = w.Text(placeholder="ask about the picture", layout=w.Layout(width="60%"))
        self.send_button = w.Button(description="send", button_style="primary")
        self.reset_button = w.Button(description="reset")
        self.temperature = w.FloatSlider(value=0.0, min=0.0, max=2.0, step=0.05, description="temperature")
        self.top_p = w.FloatSlider(value=1.0, min=0.05, max=1.0, step=0.05, description="top-p")
        self.max_tokens = w.IntSlider(value=session.max_new_tokens, min=1, max=256, description="max tokens")
        self.show_prompt = w.ToggleButton(value=False, description="show prompt")
        self.log = w.Output(layout=w.Layout(border="1px solid #ccc", min_height="80px"))
        self.prompt_view = w.Output()

        self.scene.observe(lambda change: change["new"] and self.pick(change["new"]), names="value")
        self.upload.observe(lambda change: self._on_upload(change["new"]), names="value")
        self.send_button.on_click(lambda _: self.send())
        self.reset_button.on_click(lambda _: self.reset())
        self.show_prompt.observe(lambda _: self._show_prompt(), names="value")
        self.ui = w.VBox(
            [
                w.HBox([self.picture, w.VBox([self.scene, self.upload])]),
                w.HBox([self.question, self.send_button, self.reset_button]),
                w.HBox([self.temperature, self.top_p, self.max_tokens]),
                self.log,
                self.show_prompt,
                self.prompt_view,
            ]
        )
        if session.image is not None:
            self._show_picture()

    def _ipython_display_(self):
        from IPython.display import display  # only a notebook displays the widget

        display(self.ui)

    # ------------------------------------------------------------------ what the controls call
    def pick(self, name: str) -> None:
        """Discuss the scene ``name`` of the drop-down."""
        self._use(self.scenes[name], name)

    def use_file(self, name: str, content: bytes) -> None:
        """Discuss an uploaded file (written to a temporary folder, read like any file on disk)."""
        path = self._upload_dir / Path(name).name
        path.write_bytes(content)
        self._use(path, name)

    def send(self, question: str | None = None) -> str | None:
        """Ask ``question`` (default: the text box), the reply streaming into the log."""
        question = self.question.value if question is None else question
        self.question.value = ""
        self.log.append_stdout(f"you: {question}\nllava: ")
        try:
            reply = self.session.ask(
                question,
                temperature=self.temperature.value,
                top_p=self.top_p.value,
                max_new_tokens=self.max_tokens.value,
                on_token=_after_leading_space(self.log.append_stdout),
            )
        except ValueError as e:  # no picture, an empty question, a conversation too long: said in the log
            self.log.append_stdout(f"({e})\n")
            return None
        self.log.append_stdout("\n")
        self._show_prompt()
        return reply

    def reset(self) -> None:
        """Start the conversation over (the picture stays)."""
        self.session.reset()
        self.log.outputs = ()  # set, not clear_output(): that needs a frontend
        self._show_prompt()

    # ------------------------------------------------------------------ inside
    def _use(self, image, name: str) -> None:
        self.log.outputs = ()  # set, not clear_output(): that needs a frontend
        try:
            self.session.set_image(image, name)
        except ValueError as e:  # an unreadable file: the error names it
            self.log.append_stdout(f"({e})\n")
            return
        self._show_picture()
        self._show_prompt()

    def _on_upload(self, value) -> None:
        got = _uploaded(value)
        if got:
            self.use_file(*got)

    def _show_picture(self) -> None:
        self.picture.value = _png(self.session.square(), 160)
        self.log.append_stdout(f"(talking about {self.session.image_name})\n")

    def _show_prompt(self) -> None:
        self.prompt_view.outputs = ()
        p = self.session.prompt()
        if self.show_prompt.value and p is not None:
            self.prompt_view.append_stdout(f"{p.text}\n({p.summary()})\n")


def chat_widget(session: ChatSession, scenes: Mapping[str, str | os.PathLike] | Sequence | None = None) -> ChatWidget:
    """The notebook chat over ``session``; ``scenes``: ``{name: path}`` or paths for the drop-down."""
    return ChatWidget(session, scenes)
