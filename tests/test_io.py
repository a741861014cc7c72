"""Atomic writers: the user's umask, bytes on disk before the rename, a killed writer's leftovers
removed by the next write (and a live writer's kept), and text that is not UTF-8 named with its file."""

import os
import subprocess
import sys

import pytest

from llava_lite import io


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_outputs_get_the_mode_the_users_umask_gives(tmp_path):
    old = os.umask(0o027)
    try:
        io.write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640  # 0o666 & ~0o027, not mkstemp's 0o600


def test_the_file_and_its_folder_reach_the_disk_around_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))
    )
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b)))
    io.write_text(tmp_path / "b.txt", "hello")
    kinds = [k for k, _ in events]
    assert kinds == ["fsync", "replace", "fsync"]
    assert events[0][1].endswith(".tmp") and events[2][1] == str(tmp_path)
    assert (tmp_path / "b.txt").read_text() == "hello"


def test_a_killed_writers_temp_file_is_removed_by_the_next_write_and_a_live_ones_is_kept(tmp_path):
    dead = tmp_path / f".c.json.{_dead_pid()}.k3j2h1aa.tmp"
    dead.write_text("half")
    live_proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = tmp_path / f".c.json.{live_proc.pid}.zz9y8x7w.tmp"
        live.write_text("being written")
        other = tmp_path / f".d.json.{_dead_pid()}.aaaaaaaa.tmp"  # another file's: not this write's business
        other.write_text("x")
        io.write_json(tmp_path / "c.json", [1])
        assert not dead.exists() and live.exists() and other.exists()
        assert io.remove_stale_temps_in(tmp_path) == 1 and not other.exists() and live.exists()
    finally:
        live_proc.kill()
        live_proc.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["c.json", live.name])


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    io.write_text(tmp_path / "e.txt", "old")
    with pytest.raises(RuntimeError):
        with io.atomic_path(tmp_path / "e.txt") as tmp:
            tmp.write_text("new, half")
            raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == ["e.txt"] and (tmp_path / "e.txt").read_text() == "old"


def test_json_with_a_byte_order_mark_reads_and_latin1_names_the_file_and_line(tmp_path):
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + b'[{"id": "1"}]')
    assert io.read_json(tmp_path / "bom.json") == [{"id": "1"}]
    (tmp_path / "latin1.json").write_bytes(b'[\n{"id": "caf\xe9"}]')
    with pytest.raises(ValueError, match=r"latin1\.json: not UTF-8 text \(byte 0xe9 at offset 13, line 2\)"):
        io.read_json(tmp_path / "latin1.json")
