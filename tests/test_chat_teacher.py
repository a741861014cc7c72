"""The chat teacher against a real HTTP server of our own that fails on purpose
(llava_lite/teachers/testing_server.py), plus its prompt files and reply parser."""

import dataclasses
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from llava_lite import jsonl
from llava_lite.coco import SymbolicContext
from llava_lite.config import TeacherConfig
from llava_lite.facts import Obj
from llava_lite.teachers import chat
from llava_lite.teachers.endpoint import ChatEndpoint, retry_after_seconds
from llava_lite.teachers.prompts import RESPONSE_TYPES, load_prompts
from llava_lite.teachers.replies import MalformedReply, parse_reply
from llava_lite.teachers.testing_server import MALFORMED_DETAIL, MALFORMED_REPLY, FaultyChatServer
from llava_lite.validate import validate_file

import kill_worker

KEY_ENV = "LLAVA_LITE_TEST_CHAT_KEY"
KEY = "sk-test-5f1e9c0d2b7a4e68"


def make_contexts(n: int, start: int = 1) -> list[SymbolicContext]:
    names = ["red circle", "blue square", "person", "dog", "green triangle", "bicycle"]
    out = []
    for i in range(start, start + n):
        objs = [Obj(names[(i + k) % len(names)], (0.1 * k, 0.1, 0.1 * k + 0.2, 0.4)) for k in range(1 + i % 4)]
        captions = [f"scene {i} has things.", f"another view of scene {i}."]
        out.append(SymbolicContext(i, f"{i:012d}.png", 64, 64, captions, objs))
    return out


def teacher(server: FaultyChatServer, **changes) -> TeacherConfig:
    settings = dict(
        kind="chat",
        model="test-model",
        base_url=server.base_url,
        api_key_env=KEY_ENV,
        chat_timeout_s=1.0,
        chat_backoff_s=0.02,
        chat_max_backoff_s=0.1,
        chat_concurrency=8,
        chat_max_retries=4,
        chat_format_retries=2,
    )
    settings.update(changes)
    return TeacherConfig(**settings)


def server_key(ctx: SymbolicContext, rtype: str) -> str:
    return f"{rtype}\n{ctx.text()}"


def unit_of(key: str) -> tuple[int, str]:
    rtype, _, context = key.partition("\n")
    return int(re.match(r"scene (\d+) ", context).group(1)), rtype


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


# ---------------------------------------------------------------- prompt files and the parser


@pytest.mark.parametrize("rtype", RESPONSE_TYPES)
def test_prompt_files_load_and_their_own_examples_parse_in_the_requested_format(rtype):
    prompts = load_prompts(rtype)
    assert prompts.system and len(prompts.examples) >= 2
    for context, response in prompts.examples:
        assert "\n\n" in context and ": [" in context  # captions, blank line, boxes
        parsed = parse_reply(rtype, response)
        if rtype == "complex":
            assert len(parsed) == 1
        if rtype == "conversation":
            assert len(parsed) >= 3
    if rtype == "detail":
        assert len(prompts.instructions) >= 10 and len(set(prompts.instructions)) == len(prompts.instructions)
    else:
        assert "===" in prompts.system  # the system message shows the format it wants


def test_messages_are_system_then_example_pairs_then_the_new_context():
    prompts = load_prompts("conversation")
    msgs = prompts.messages("a new context")
    roles = [m["role"] for m in msgs]
    assert roles == ["system"] + ["user", "assistant"] * len(prompts.examples) + ["user"]
    assert msgs[-1]["content"] == "a new context" and msgs[0]["content"] == prompts.system


def test_parser_reads_repeated_pairs_labels_on_the_same_line_and_a_missing_last_separator():
    text = "Question:\nHow many?\n===\nAnswer:\nTwo.\n===\nQuestion: Where?\n===\nAnswer: Left.\n"
    assert parse_reply("conversation", text) == [("How many?", "Two."), ("Where?", "Left.")]
    assert parse_reply("complex", "Question:\nWhy?\n===\nAnswer:\nFirst this,\nthen that.\n===\n") == [
        ("Why?", "First this,\nthen that.")
    ]
    assert parse_reply("detail", "  A plain paragraph.\n") == "A plain paragraph."


@pytest.mark.parametrize(
    "rtype, text, why",
    [
        ("conversation", MALFORMED_REPLY, "expected 'Question:'"),
        ("conversation", "Answer:\nTwo.\n===", "expected 'Question:'"),
        ("conversation", "Question:\nHow many?\n===", "has no answer"),
        ("conversation", "Question:\nHow many?\n===\nAnswer:\n\n===", "empty answer"),
        ("conversation", "Question:\nWhat is in the <image>?\n===\nAnswer:\nA dog.\n===", "image token"),
        ("complex", "Question:\nA?\n===\nAnswer:\nB.\n===\nQuestion:\nC?\n===\nAnswer:\nD.\n===", "exactly one"),
        ("detail", MALFORMED_DETAIL, "plain text"),
        ("detail", "   ", "empty reply"),
        ("detail", "\x07\x06k}\x04", "not clean text"),
        ("detail", "caf\ufffd au lait", "not clean text"),
    ],
)
def test_parser_rejects_malformed_replies_saying_why(rtype, text, why):
    with pytest.raises(MalformedReply, match=re.escape(why)):
        parse_reply(rtype, text)


def test_retry_after_reads_seconds_and_http_dates():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= retry_after_seconds(date) <= 31


def test_torn_last_line_is_dropped_before_the_next_record_is_appended(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "conv')  # stopped mid-write
    assert [r["id"] for _, r in jsonl.read_jsonl(path)] == ["a", "b"]
    with jsonl.open_for_append(path) as f:
        jsonl.append(f, {"id": "d"})
    assert [r["id"] for _, r in jsonl.read_jsonl(path, skip_torn_tail=False)] == ["a", "b", "d"]
    path.write_text('{"id": "a"}')  # complete, only the newline missing: kept
    with jsonl.open_for_append(path) as f:
        jsonl.append(f, {"id": "b"})
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n'


# ---------------------------------------------------------------- end to end, with faults

# per unit, what the server does on its 1st, 2nd, ... request (then "ok")
SCENARIOS = [
    ["ok"],
    ["500", "ok"],
    ["429", "ok"],
    ["slow", "ok"],
    ["malformed", "ok"],
    ["drop", "ok"],
    ["malformed"] * 3,
    ["500", "drop", "malformed", "ok"],
    ["400"],
    ["cut", "ok"],
]


def scenario(key: str) -> list[str]:
    image_id, rtype = unit_of(key)
    return SCENARIOS[(image_id * len(RESPONSE_TYPES) + RESPONSE_TYPES.index(rtype)) % len(SCENARIOS)]


def scripted(key: str, n: int) -> str:
    steps = scenario(key)
    return steps[n] if n < len(steps) else "ok"


def read_ids(path: Path) -> list[str]:
    return [r["id"] for _, r in jsonl.read_jsonl(path)]


def assert_key_nowhere(root: Path, *texts: str) -> None:
    for text in texts:
        assert KEY not in text
    for path in root.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), f"API key written to {path}"


def test_faults_lose_no_context_duplicate_none_record_failures_with_raw_text_and_never_leak_the_key(
    tmp_path, caplog, capfd
):
    caplog.set_level(logging.DEBUG)
    contexts = make_contexts(12)
    out = tmp_path / "chat.jsonl"
    with FaultyChatServer(scripted, api_key=KEY, slow_s=2.0, retry_after_s=1) as server:
        stats = chat.generate(contexts, out, teacher(server), image_prefix="train", progress=True)
    log = server.log

    units = {(c.image_id, t): c for c in contexts for t in RESPONSE_TYPES}
    expect_fail = {u for u in units if scenario(server_key(units[u], u[1])) in (["malformed"] * 3, ["400"])}
    assert {"malformed", "500", "429", "slow", "drop", "400", "cut"} <= {e["fault"] for e in log}  # every fault was hit

    ids = read_ids(out)
    assert len(ids) == len(set(ids)), "a sample was written twice"
    assert set(ids) == {chat.sample_id(*u) for u in units if u not in expect_fail}
    failures = [r for _, r in jsonl.read_jsonl(chat.failures_path_for(out))]
    assert sorted(r["id"] for r in failures) == sorted(chat.sample_id(*u) for u in expect_fail)
    for rec in failures:
        steps = scenario(server_key(units[(rec["image_id"], rec["type"])], rec["type"]))
        if steps == ["400"]:
            assert rec["reason"] == "rejected" and "400" in rec["error"] and rec["attempts"] == []
        else:
            raw = MALFORMED_DETAIL if rec["type"] == "detail" else MALFORMED_REPLY
            assert rec["reason"] == "malformed" and [a["raw"] for a in rec["attempts"]] == [raw] * 3

    # every sample belongs to its own context (no mix-up between concurrent requests)
    for _, sample in jsonl.read_jsonl(out):
        ctx = units[(int(sample["id"].split("-")[0]), sample["type"])]
        assert sample["image"] == f"train/{ctx.file_name}"
        answers = " ".join(t["value"] for t in sample["conversations"][1::2])
        assert all(o.name in answers for o in ctx.objects)
    assert validate_file(out).ok

    # the counts agree with what the server saw and sent
    faults = Counter(e["fault"] for e in log)
    assert stats.requests == len(log)
    delivered = [e for e in log if e["fault"] in ("ok", "malformed", "cut")]
    assert stats.completions == len(delivered)
    assert stats.prompt_tokens == sum(e["usage"]["prompt_tokens"] for e in delivered)
    assert stats.completion_tokens == sum(e["usage"]["completion_tokens"] for e in delivered)
    assert stats.retried == {
        k: v
        for k, v in {
            "500": faults["500"],
            "429": faults["429"],
            "timeout": faults["slow"],
            "connection": faults["drop"],
        }.items()
        if v
    }
    assert stats.malformed_replies == faults["malformed"] + faults["cut"]
    assert (stats.samples, stats.failures) == (len(ids), len(failures))

    captured = capfd.readouterr()
    assert_key_nowhere(tmp_path, caplog.text, captured.out, captured.err, *(str(r.args) for r in caplog.records))


def test_429_waits_at_least_as_long_as_retry_after_asks():
    with FaultyChatServer(lambda key, n: "429" if n == 0 else "ok", retry_after_s=1) as server:
        with ChatEndpoint(server.base_url, "m", KEY_ENV, backoff_s=0.01, max_backoff_s=0.01) as endpoint:
            t0 = time.monotonic()
            endpoint.complete(load_prompts("detail").messages("scene 1 has things.\n\nred circle: [0, 0, 1, 1]"))
            assert time.monotonic() - t0 >= 1.0
            assert endpoint.counts.requests == 2 and endpoint.counts.retried == {"429": 1}


_KILL_SCRIPT = """
import json, sys, logging
logging.basicConfig(level=logging.DEBUG)
from llava_lite.coco import SymbolicContext
from llava_lite.config import TeacherConfig
from llava_lite.facts import Obj
from llava_lite.teachers import chat
docs = json.load(open(sys.argv[1]))
contexts = [SymbolicContext(d["image_id"], d["file_name"], 64, 64, d["captions"],
                            [Obj(n, tuple(b)) for n, b in d["objects"]]) for d in docs]
cfg = TeacherConfig(**json.load(open(sys.argv[2])))
chat.generate(contexts, sys.argv[3], cfg, progress=False)
"""


def test_resume_after_a_kill_asks_nothing_twice_for_a_finished_context(tmp_path, caplog):
    contexts = make_contexts(12)
    out = tmp_path / "chat.jsonl"
    (tmp_path / "contexts.json").write_text(
        json.dumps(
            [
                {
                    "image_id": c.image_id,
                    "file_name": c.file_name,
                    "captions": c.captions,
                    "objects": [[o.name, list(o.box)] for o in c.objects],
                }
                for c in contexts
            ]
        )
    )
    with FaultyChatServer(api_key=KEY, latency_s=0.05) as server:
        cfg = teacher(server, chat_concurrency=2)
        (tmp_path / "teacher.json").write_text(json.dumps(cfg.__dict__))
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _KILL_SCRIPT,
                str(tmp_path / "contexts.json"),
                str(tmp_path / "teacher.json"),
                str(out),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 8):
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        child_log = proc.communicate()[0].decode()
        first = read_ids(out)
        assert 8 <= len(first) < 36, "the run should have been stopped part way"
        asked_before = len(server.log)

        caplog.set_level(logging.DEBUG)
        stats = chat.generate(contexts, out, cfg, progress=False)
        asked_again = {unit_of(k) for k in server.keys_asked()[asked_before:]}

    finished_first = {(int(i.split("-")[0]), i.split("-", 1)[1]) for i in first}
    assert not asked_again & finished_first, "a finished context was asked for again"
    assert stats.already_done == len(first) and stats.samples == 36 - len(first)
    ids = read_ids(out)
    assert len(ids) == len(set(ids)) == 36
    assert_key_nowhere(tmp_path, child_log, caplog.text)


def test_failed_contexts_are_not_asked_again_unless_retry_failed(tmp_path):
    contexts = make_contexts(3)
    out = tmp_path / "chat.jsonl"
    plan = lambda key, n: "malformed" if unit_of(key) == (2, "complex") and n < 3 else "ok"  # noqa: E731
    with FaultyChatServer(plan) as server:
        cfg = teacher(server)
        first = chat.generate(contexts, out, cfg, progress=False)
        assert (first.samples, first.failures) == (8, 1)
        n = len(server.log)
        second = chat.generate(contexts, out, cfg, progress=False)
        assert len(server.log) == n and (second.already_done, second.already_failed) == (8, 1)
        third = chat.generate(contexts, out, cfg, progress=False, retry_failed=True)
        assert [unit_of(k) for k in server.keys_asked()[n:]] == [(2, "complex")]
    assert third.samples == 1 and sorted(read_ids(out)) == sorted(
        chat.sample_id(c.image_id, t) for c in contexts for t in RESPONSE_TYPES
    )


def test_wrong_api_key_stops_at_once_records_nothing_and_does_not_echo_the_key(tmp_path, caplog):
    out = tmp_path / "chat.jsonl"
    with FaultyChatServer(api_key="the-right-key") as server:
        with pytest.raises(RuntimeError, match="401") as err:
            chat.generate(make_contexts(4), out, teacher(server, chat_concurrency=1), progress=False)
    assert len(server.log) == 0  # refused before the plan was consulted
    assert read_ids(out) == [] and read_ids(chat.failures_path_for(out)) == []
    assert_key_nowhere(tmp_path, str(err.value), caplog.text)


def test_endpoint_that_keeps_failing_stops_the_run_and_a_later_run_finishes_only_what_is_missing(tmp_path):
    contexts = make_contexts(3)
    out = tmp_path / "chat.jsonl"
    broken = {"on": True}
    plan = lambda key, n: "500" if broken["on"] and unit_of(key) == (1, "detail") else "ok"  # noqa: E731
    with FaultyChatServer(plan) as server:
        cfg = teacher(server, chat_concurrency=1, chat_max_retries=3)
        with pytest.raises(RuntimeError, match="gave up after 4 attempts"):
            chat.generate(contexts, out, cfg, progress=False)
        assert [unit_of(k) for k in server.keys_asked()].count((1, "detail")) == 4
        assert chat.sample_id(1, "detail") not in read_ids(out)
        assert read_ids(chat.failures_path_for(out)) == []  # endpoint trouble is not the context's failure
        finished = {(int(i.split("-")[0]), i.split("-", 1)[1]) for i in read_ids(out)}
        broken["on"] = False
        n = len(server.log)
        chat.generate(contexts, out, cfg, progress=False)
        asked = {unit_of(k) for k in server.keys_asked()[n:]}
    assert (1, "detail") in asked and not asked & finished
    assert sorted(read_ids(out)) == sorted(chat.sample_id(c.image_id, t) for c in contexts for t in RESPONSE_TYPES)


# ---------------------------------------------------------------- nothing lost, nothing stale
def test_a_200_without_a_completion_is_a_failure_of_its_unit_not_a_stop_of_the_run(tmp_path):
    contexts = make_contexts(3)
    out = tmp_path / "chat.jsonl"
    plan = lambda key, n: "empty" if unit_of(key) == (2, "detail") else "ok"  # noqa: E731
    with FaultyChatServer(plan) as server:
        cfg = teacher(server, chat_max_retries=2)
        stats = chat.generate(contexts, out, cfg, progress=False)
        assert [unit_of(k) for k in server.keys_asked()].count((2, "detail")) == 3  # retried, then recorded
        n = len(server.log)
        again = chat.generate(contexts, out, cfg, progress=False)
        assert len(server.log) == n  # the next run does not stop at the same unit again
    assert (stats.samples, stats.failures) == (8, 1) and (again.already_done, again.already_failed) == (8, 1)
    (failure,) = [r for _, r in jsonl.read_jsonl(chat.failures_path_for(out))]
    assert failure["id"] == "2-detail" and failure["reason"] == "no_completion"
    assert "3 replies of HTTP 200 without a completion" in failure["error"]


def test_samples_of_a_redrawn_world_or_another_model_are_asked_again_and_replaced(tmp_path, caplog):
    contexts = make_contexts(3)
    out = tmp_path / "chat.jsonl"
    with FaultyChatServer() as server:
        chat.generate(contexts, out, teacher(server), progress=False)
        n = len(server.log)
        redrawn = make_contexts(3)
        redrawn[1].objects = redrawn[1].objects[:1] + [Obj("dog", (0.5, 0.5, 0.9, 0.9))]  # same id, another scene
        caplog.set_level(logging.WARNING)
        stats = chat.generate(redrawn, out, teacher(server), progress=False)
        assert sorted(unit_of(k) for k in server.keys_asked()[n:]) == [(2, t) for t in sorted(RESPONSE_TYPES)]
        assert stats.stale == 3 and stats.already_done == 6 and "another world, prompt or model" in caplog.text
        n = len(server.log)
        other_model = chat.generate(redrawn, out, teacher(server, model="another-model"), progress=False)
        assert len(server.log) == n + 9 and other_model.stale == 9
    ids = read_ids(out)
    assert sorted(ids) == sorted(chat.sample_id(c.image_id, t) for c in contexts for t in RESPONSE_TYPES)
    assert all("dog" in " ".join(t["value"] for t in r["conversations"]) for _, r in jsonl.read_jsonl(out)
               if r["id"].startswith("2-"))  # fmt: skip


def test_a_reply_torn_inside_a_multibyte_character_by_a_kill_does_not_stop_the_resume(tmp_path):
    contexts = make_contexts(2)
    out = tmp_path / "chat.jsonl"
    with FaultyChatServer() as server:
        cfg = teacher(server)
        chat.generate(contexts[:1], out, cfg, progress=False)
        out.write_bytes(out.read_bytes() + ('{"id": "2-detail", "text": "' + "é" * 3000).encode()[:-1])
        stats = chat.generate(contexts, out, cfg, progress=False)
    assert stats.already_done == 3 and stats.samples == 3
    assert sorted(read_ids(out)) == sorted(chat.sample_id(c.image_id, t) for c in contexts for t in RESPONSE_TYPES)


def test_ctrl_c_stops_at_once_keeps_every_reply_received_and_the_rerun_asks_only_the_rest(tmp_path, ctrl_c):
    contexts = make_contexts(4)
    out = tmp_path / "chat.jsonl"
    plan = lambda key, n: "slow" if unit_of(key)[1] == "detail" and n == 0 else "ok"  # noqa: E731
    with FaultyChatServer(plan, slow_s=8.0) as server:
        cfg = teacher(server, chat_concurrency=12, chat_timeout_s=20.0)
        timer = threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGINT))
        t0 = time.monotonic()
        timer.start()
        with pytest.raises(KeyboardInterrupt, match="stopped by Ctrl-C: 8 samples"):
            chat.generate(contexts, out, cfg, progress=False)
        assert time.monotonic() - t0 < 5.0  # not the 8 s of the slow replies, nor the 20 s timeout
        assert sorted(read_ids(out)) == sorted(
            chat.sample_id(c.image_id, t) for c in contexts for t in ("conversation", "complex")
        )
        n = len(server.log)
        chat.generate(contexts, out, cfg, progress=False)
        assert sorted(unit_of(k) for k in server.keys_asked()[n:]) == [(c.image_id, "detail") for c in contexts]
    ids = read_ids(out)
    assert len(ids) == len(set(ids)) == 12


def test_runs_killed_mid_record_and_between_records_end_with_an_unbroken_runs_samples(tmp_path):
    rng = random.Random(3)
    with FaultyChatServer(latency_s=0.01) as server:
        cfg = teacher(server, chat_concurrency=2)
        chat.generate(kill_worker.chat_contexts(6), tmp_path / "straight.jsonl", cfg, progress=False)
        kills = [
            {"call": "llava_lite.jsonl:append", "n": rng.randint(2, 6), "half": True},  # torn inside an "é"
            {"call": "llava_lite.jsonl:append", "n": rng.randint(2, 6)},  # between two lines
            {"call": "llava_lite.jsonl:append", "n": 1, "half": True},
        ]
        out = tmp_path / "chat.jsonl"
        args = {"contexts": 6, "out": str(out), "teacher": dataclasses.asdict(cfg)}
        assert kill_worker.kill_and_resume("chat", args, kills, tmp_path) == [-9, -9, -9]
        chat.generate(kill_worker.chat_contexts(6), out, cfg, progress=False)
    ids = read_ids(out)
    assert len(ids) == len(set(ids)) == 18
    by_id = lambda path: sorted((r for _, r in jsonl.read_jsonl(path)), key=lambda r: r["id"])  # noqa: E731
    assert by_id(out) == by_id(tmp_path / "straight.jsonl")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
