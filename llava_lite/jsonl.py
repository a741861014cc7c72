"""Append-only JSON Lines files that survive being stopped at any moment.

A long job appends one record a line and flushes it, so a stop loses at most the line being
written. :func:`open_for_append` repairs that torn last line (drops it, with a warning) before
appending, so the next record never fuses with it; :func:`read_jsonl` reads what is there.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from . import io

log = logging.getLogger(__name__)


def read_jsonl(path: str | os.PathLike, skip_torn_tail: bool = True) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each line; a bad line (not JSON, or not UTF-8) raises, naming the
    file and line, unless it is a torn last line (no newline at the end) and ``skip_torn_tail`` is set.

    Lines are decoded one by one, so a kill that cut the last line inside a multibyte character
    is a torn line like any other, not an error for the whole file."""
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_bytes().split(b"\n")
    # a file that ends with "\n" splits into [..., b""]; anything else in the last slot is torn
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
            yield i, json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if i == len(lines) and skip_torn_tail:
                log.warning("%s: line %d is cut off (the run was stopped while writing it); ignoring it", path, i)
                return
            if isinstance(e, UnicodeDecodeError):
                raise ValueError(
                    f"{path}: line {i} is not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})"
                ) from None
            raise ValueError(f"{path}: line {i} is not valid JSON ({e.msg}, column {e.colno})") from None


def open_for_append(path: str | os.PathLike) -> IO[str]:
    """Open for appending after making sure the file ends at a complete line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        with open(path, "rb+") as f:
            data = f.read()
            if not data.endswith(b"\n"):
                start = data.rfind(b"\n") + 1
                try:
                    json.loads(data[start:])
                    f.write(b"\n")  # a complete record that only lacks its newline
                except ValueError:
                    log.warning("%s: dropping a cut-off last line (%d bytes)", path, len(data) - start)
                    f.truncate(start)
    return open(path, "a", encoding="utf-8")


def append(f: IO[str], record: dict) -> None:
    """Write one record as one line and push it to the operating system."""
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()


def write_jsonl(path: str | os.PathLike, records) -> None:
    """All of ``records`` as a JSON Lines file, one a line, written atomically (a reader never sees half of it)."""
    io.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
