"""Parse a chat teacher's reply into turns, or say exactly why it cannot be used.

Conversation and complex replies use the paper's block format, every block closed by a line
``===``::

    Question:
    How many dogs are there?
    ===
    Answer:
    There are two dogs.
    ===

(a conversation repeats the pair; complex has exactly one; the label may share its line with
the text; the last ``===`` may be missing). A detail reply is plain text.
"""

from __future__ import annotations

import re

IMAGE_TOKEN = "<image>"
_SEPARATOR = re.compile(r"^[ \t]*===[ \t]*$", re.MULTILINE)
_LABEL = re.compile(r"(question|answer)[ \t]*:[ \t]*", re.IGNORECASE)
# control characters (other than tab and line breaks) and U+FFFD, the mark of undecodable bytes
_GARBLED = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")


class MalformedReply(ValueError):
    """A reply that does not follow the requested format."""


def parse_qa(text: str) -> list[tuple[str, str]]:
    """(question, answer) pairs of a ``Question: / === / Answer: / ===`` reply."""
    blocks = [b.strip() for b in _SEPARATOR.split(text.replace("\r\n", "\n"))]
    if blocks and not blocks[-1]:
        blocks.pop()  # the text after the closing ===
    if not blocks:
        raise MalformedReply("empty reply")
    pairs, question = [], None
    for i, block in enumerate(blocks):
        want = "question" if question is None else "answer"
        m = _LABEL.match(block)
        if m is None or m.group(1).lower() != want:
            raise MalformedReply(f"block {i + 1}: expected '{want.capitalize()}:', found {block[:60]!r}")
        body = block[m.end() :].strip()
        if not body:
            raise MalformedReply(f"block {i + 1}: empty {want}")
        if question is None:
            question = body
        else:
            pairs.append((question, body))
            question = None
    if question is not None:
        raise MalformedReply(f"question {len(pairs) + 1} has no answer: {question[:60]!r}")
    return pairs


def parse_reply(rtype: str, text: str) -> list[tuple[str, str]] | str:
    """Pairs for ``conversation`` (at least one) and ``complex`` (exactly one), text for ``detail``."""
    if not isinstance(text, str) or not text.strip():
        raise MalformedReply("empty reply")
    garbled = _GARBLED.search(text)
    if garbled:
        raise MalformedReply(f"reply is not clean text: it contains {garbled.group()!r}")
    if IMAGE_TOKEN in text:
        raise MalformedReply(f"reply contains the image token {IMAGE_TOKEN}")
    if rtype == "detail":
        if _LABEL.match(text.strip()) or _SEPARATOR.search(text):
            raise MalformedReply("a detail reply should be plain text, found Question/Answer blocks")
        return text.strip()
    pairs = parse_qa(text)
    if rtype == "complex" and len(pairs) != 1:
        raise MalformedReply(f"complex reasoning wants exactly one question, found {len(pairs)}")
    if rtype not in ("conversation", "complex"):
        raise ValueError(f"unknown response type {rtype!r}")
    return pairs
