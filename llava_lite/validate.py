"""Check instruction data in LLaVA's format: the project's files and the official ones alike.

``llava-lite validate FILE [--images DIR]`` reads a JSON list of samples (LLaVA's files) or JSON
Lines (one sample a line, what the teachers append to) and checks every sample:

* ``id`` present (a string or a number) and unique in the file, except that LLaVA's released
  instruction files give the samples of one image that image's id (allowed: same id, same image);
* ``conversations`` a non-empty list of ``{"from", "value"}`` turns;
* roles alternate ``human`` / ``gpt``, the first is ``human``, the last ``gpt``;
* every ``value`` a non-empty string;
* a sample with an ``image`` has exactly one ``<image>``, in the first human turn, on its first
  or last line; a sample without one (text-only) has none anywhere;
* with ``--images DIR``: ``DIR/<image>`` exists.

Each problem names the sample (its position and id) and the turn; a summary ends the report
and the exit code is 1 when there is any problem. Extra keys (``type``, ...) are allowed.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import io
from .teachers.replies import IMAGE_TOKEN

log = logging.getLogger(__name__)

ROLES = ("human", "gpt")


@dataclass(frozen=True)
class Problem:
    where: str  # "sample 3" (JSON list, from 0) or "line 4" (JSON Lines, from 1)
    sample_id: Any
    turn: int | None  # index into conversations, or None for the sample as a whole
    rule: str  # short name of the broken rule, for the summary
    message: str

    def __str__(self) -> str:
        who = self.where + (f" (id {self.sample_id!r})" if self.sample_id is not None else "")
        return who + (f", turn {self.turn}" if self.turn is not None else "") + f": {self.message}"


@dataclass
class Report:
    path: Path
    samples: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.ok:
            return f"{self.path}: {self.samples} samples, no problems"
        bad = len({p.where for p in self.problems})
        rules = ", ".join(f"{rule}: {n}" for rule, n in Counter(p.rule for p in self.problems).most_common())
        return f"{self.path}: {self.samples} samples, {len(self.problems)} problems in {bad} samples ({rules})"


def load_samples(path: str | Path) -> tuple[list[tuple[str, Any]], list[Problem]]:
    """(where, sample) pairs and the lines that are not JSON (JSON Lines only: a JSON list that
    does not parse raises, naming the line and column)."""
    path = Path(path)
    text = io.read_text(path)
    if path.suffix != ".jsonl":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # several values one after another: JSON Lines after all
                raise ValueError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        else:
            if isinstance(doc, dict):
                doc = [doc]
            if not isinstance(doc, list):
                raise ValueError(f"{path}: expected a JSON list of samples, found {type(doc).__name__}")
            return [(f"sample {i}", s) for i, s in enumerate(doc)], []
    samples, problems = [], []
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            samples.append((f"line {i}", json.loads(line)))
        except json.JSONDecodeError as e:
            problems.append(Problem(f"line {i}", None, None, "json", f"not valid JSON ({e.msg}, column {e.colno})"))
    return samples, problems


def _image_problems(turns: list, has_image: bool) -> list[tuple[int | None, str, str]]:
    found = []
    counts = [
        t["value"].count(IMAGE_TOKEN) if isinstance(t, dict) and isinstance(t.get("value"), str) else 0 for t in turns
    ]
    if not has_image:
        return [(i, "image-token", f"{IMAGE_TOKEN} in a sample without an image") for i, n in enumerate(counts) if n]
    for i, n in enumerate(counts[1:], 1):
        if n:
            found.append((i, "image-token", f"{IMAGE_TOKEN} outside the first human turn"))
    if counts[0] == 0:
        found.append((0, "image-token", f"no {IMAGE_TOKEN} in the first human turn (the sample has an image)"))
    elif counts[0] > 1:
        found.append((0, "image-token", f"{counts[0]} {IMAGE_TOKEN} tokens in the first human turn, expected 1"))
    else:
        lines = [line.strip() for line in turns[0]["value"].strip().split("\n")]
        if lines[0] != IMAGE_TOKEN and lines[-1] != IMAGE_TOKEN:
            line = next(line for line in lines if IMAGE_TOKEN in line)
            found.append(
                (
                    0,
                    "image-token",
                    f"{IMAGE_TOKEN} should be the whole first or last line of the turn, found the line {line[:60]!r}",
                )
            )
    return found


def check_sample(sample: Any, images: Path | None = None) -> list[tuple[int | None, str, str]]:
    """(turn, rule, message) for every problem of one sample (uniqueness of ids is the file's job)."""
    if not isinstance(sample, dict):
        return [(None, "sample", f"expected an object, found {type(sample).__name__}")]
    found: list[tuple[int | None, str, str]] = []
    sid = sample.get("id")
    if sid is None:
        found.append((None, "id", "no 'id'"))
    elif not isinstance(sid, (str, int)) or isinstance(sid, bool) or sid == "":
        found.append((None, "id", f"'id' should be a non-empty string or a number, found {sid!r}"))
    image = sample.get("image")
    has_image = image is not None
    if has_image and not (isinstance(image, str) and image.strip()):
        found.append((None, "image", f"'image' should be a file name, found {image!r}"))
        has_image = False
    elif has_image and images is not None and not (images / image).is_file():
        found.append((None, "image-file", f"image file {images / image} does not exist"))
    turns = sample.get("conversations")
    if not isinstance(turns, list) or not turns:
        what = "missing" if turns is None else f"{type(turns).__name__} {turns!r:.40}"
        return found + [(None, "conversations", f"'conversations' should be a non-empty list of turns, found {what}")]
    order_ok = True
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            found.append((i, "turn", f"expected {{'from', 'value'}}, found {type(turn).__name__}"))
            order_ok = False
            continue
        role, want = turn.get("from"), ROLES[i % 2]
        if role not in ROLES:
            found.append((i, "role", f"'from' should be 'human' or 'gpt', found {role!r}"))
            order_ok = False
        elif role != want:
            found.append((i, "order", f"expected '{want}' (roles alternate, the first is 'human'), found '{role}'"))
            order_ok = False
        value = turn.get("value")
        if not isinstance(value, str):
            found.append((i, "value", f"'value' should be a string, found {type(value).__name__}"))
        elif not value.strip():
            found.append((i, "value", "empty 'value'"))
    if order_ok and len(turns) % 2:
        found.append((len(turns) - 1, "order", "the last turn is from 'human': no 'gpt' turn answers it"))
    return found + _image_problems(turns, has_image)


def validate_file(path: str | Path, images: str | Path | None = None) -> Report:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    images = Path(images) if images is not None else None
    if images is not None and not images.is_dir():
        raise FileNotFoundError(f"{images}: no such image folder")
    samples, problems = load_samples(path)
    report = Report(path, samples=len(samples), problems=problems)
    first_seen: dict[Any, tuple[str, Any]] = {}
    for where, sample in samples:
        sid = sample.get("id") if isinstance(sample, dict) else None
        key = sid if isinstance(sid, (str, int)) else None
        if key is not None:
            image = sample.get("image")
            if key not in first_seen:
                first_seen[key] = (where, image)
            elif image is None or first_seen[key][1] != image:
                first = first_seen[key][0]
                report.problems.append(Problem(where, sid, None, "duplicate-id", f"id also used by {first}"))
        for turn, rule, message in check_sample(sample, images):
            report.problems.append(Problem(where, sid, turn, rule, message))
    return report


def report_file(path: Path, images: Path | None = None, max_problems: int = 0) -> int:
    """Log every problem of a file (at most ``max_problems``, 0: all) and a summary; 1 when there are problems."""
    report = validate_file(path, images)
    shown = report.problems[:max_problems] if max_problems else report.problems
    for problem in shown:
        log.error("%s: %s", path, problem)
    if len(shown) < len(report.problems):
        log.error("... %d more problems not shown", len(report.problems) - len(shown))
    (log.info if report.ok else log.error)("%s", report.summary())
    return 0 if report.ok else 1
