"""Append-only JSON Lines: a line torn inside a multibyte character by a kill is a torn line like
any other (dropped, then appended after), and a bad line elsewhere names the file and line."""

import logging

import pytest

from llava_lite import jsonl


def test_a_line_torn_inside_a_multibyte_character_is_dropped_and_the_next_append_follows_it(tmp_path, caplog):
    path = tmp_path / "out.jsonl"
    with jsonl.open_for_append(path) as f:
        jsonl.append(f, {"id": "1", "text": "un été à Noël"})
    whole = ('{"id": "2", "text": "' + "é" * 5000 + '"}\n').encode()
    cut = whole[:9002]
    assert cut[-1] == 0xC3  # the kill fell between the two bytes of an "é"
    path.write_bytes(path.read_bytes() + cut)
    with caplog.at_level(logging.WARNING):
        assert [r["id"] for _, r in jsonl.read_jsonl(path)] == ["1"]
    assert "line 2 is cut off" in caplog.text
    with jsonl.open_for_append(path) as f:
        jsonl.append(f, {"id": "2", "text": "é"})
    assert [(i, r["id"]) for i, r in jsonl.read_jsonl(path)] == [(1, "1"), (2, "2")]


def test_a_line_that_is_not_utf8_before_the_last_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"id": 1}\n{"id": "caf\xe9"}\n{"id": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2 is not UTF-8 \(byte 0xe9 at column 12\)"):
        list(jsonl.read_jsonl(path))


def test_a_byte_order_mark_at_the_start_is_allowed(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": 1}\n')
    assert list(jsonl.read_jsonl(path)) == [(1, {"id": 1})]
