"""Atomic file writes: a reader never sees half a file, a crash never leaves one behind.

A file is written to a temporary name beside it, flushed to disk (the file, then its folder)
and renamed into place, so after a crash or a power cut the name holds the old bytes or the
new ones. The temporary name carries the writer's process id: a later write of the same file
removes the leftovers of a writer that was killed (its process is gone), never those of one
still running. Outputs get the mode the user's umask gives, like any file ``open`` creates.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_umask_lock = threading.Lock()


def umask() -> int:
    """The process's umask (read from ``/proc`` where it is there, else set and put back)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def fsync_path(path: str | os.PathLike) -> None:
    """Push a file's or a folder's bytes (a folder: its entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path, tag: str = "") -> str:
    """``.<name>.<pid>.<tag>`` : a temporary name beside ``path`` that says which process owns it."""
    return f".{path.name}.{os.getpid()}.{tag}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]*\.tmp$")


def _stale(folder: Path, name: str | None) -> list[Path]:
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = _TEMP.match(p.name)
        if m and (name is None or m["name"] == name):
            pid = int(m["pid"])
            if pid != os.getpid() and not _pid_alive(pid):
                out.append(p)
    return out


def _remove(found: list[Path]) -> int:
    for p in found:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return len(found)


_index_lock = threading.Lock()
_index: dict[str, dict[str, list[Path]]] = {}  # folder -> file name -> stale temporaries, listed once a process


def _folder_index(folder: Path) -> dict[str, list[Path]]:
    """The killed writers' temporaries in ``folder`` by the file they were for: the folder is listed
    once a process, at its first write there, so a folder of many files costs one listing, not one a
    write (a writer that dies while this process runs is cleaned by the next run)."""
    key = str(folder.resolve())
    with _index_lock:
        if key not in _index:
            by_name: dict[str, list[Path]] = {}
            for p in _stale(folder, None):
                by_name.setdefault(_TEMP.match(p.name)["name"], []).append(p)
            _index[key] = by_name
        return _index[key]


def stale_temps(path: str | os.PathLike) -> list[Path]:
    """Temporary files or folders beside ``path`` left by writers of it whose process is gone."""
    path = Path(path)
    return [p for p in _folder_index(path.parent).get(path.name, []) if p.exists()]


def remove_stale_temps(path: str | os.PathLike) -> int:
    """Remove what :func:`stale_temps` finds; returns how many."""
    path = Path(path)
    index = _folder_index(path.parent)
    with _index_lock:
        found = index.pop(path.name, [])
    return _remove([p for p in found if p.exists()])


def remove_stale_temps_in(folder: str | os.PathLike) -> int:
    """Remove every killed writer's temporary file or folder in ``folder`` (not below it), listing it afresh."""
    folder = Path(folder)
    with _index_lock:
        _index.pop(str(folder.resolve()), None)
    return _remove(_stale(folder, None))


@contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    ``durable``: flush the file and its folder to the disk around the rename (off for a job that
    writes thousands of small files and flushes them all at once, see :func:`flush_all`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_name(path), suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~umask())
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if durable:
            fsync_path(tmp_path)
        os.replace(tmp_path, path)
        if durable:
            fsync_path(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def flush_all() -> None:
    """Every file the system still holds in memory, to the disk (one call after many writes)."""
    os.sync()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> None:
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file (a leading byte-order mark is dropped); other bytes name the file and where."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{path}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}, line {line}); save it as UTF-8"
        ) from None


def read_json(path: str | os.PathLike) -> Any:
    """Read JSON; a syntax error names the file, line and column (a BOM is allowed, other encodings are not)."""
    path = Path(path)
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
