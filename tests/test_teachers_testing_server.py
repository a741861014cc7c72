"""The misbehaving chat server's plans: which fault each request of each context meets."""

import logging

import pytest

from llava_lite.teachers.testing_server import FAULTS, FaultyChatServer, reply_for, request_type, rotating_faults

FAULT_LIST = ["ok", "500", "malformed", "429"]
KEYS = [f"conversation\ncontext {i}" for i in range(12)]


def test_rotating_faults_give_each_key_every_fault_in_turn():
    plan = rotating_faults(FAULT_LIST)
    for key in KEYS:
        seen = [plan(key, n) for n in range(2 * len(FAULT_LIST))]
        start = FAULT_LIST.index(seen[0])
        assert seen == (FAULT_LIST[start:] + FAULT_LIST[:start]) * 2, key  # the list in order, round and round
    assert plan(KEYS[0], 5) == rotating_faults(FAULT_LIST)(KEYS[0], 5)  # a plan is a function of key and n


def test_rotating_faults_start_each_key_at_its_own_place():
    plan = rotating_faults(FAULT_LIST)
    assert len({plan(key, 0) for key in KEYS}) > 1  # not every context meets the same fault first


def test_every_named_fault_is_accepted_and_an_unknown_one_is_a_value_error_naming_it():
    plan = rotating_faults(FAULTS)
    assert {plan("k", n) for n in range(len(FAULTS))} == set(FAULTS)
    with pytest.raises(ValueError, match=r"unknown faults \['timeout'\]"):
        rotating_faults(["ok", "timeout"])


def test_the_complex_reply_asks_one_question_that_takes_a_step_and_answers_it_from_the_context():
    context = "Two shapes.\n\nred circle: [0.1, 0.1, 0.3, 0.3]\nblue square: [0.5, 0.5, 0.9, 0.9]"
    reply = reply_for("complex", context)
    assert reply.count("Question:") == 1 and request_type([{"role": "assistant", "content": reply}]) == "complex"
    assert "red circle, blue square, which makes 2" in reply and reply.rstrip("=\n").endswith("leaves 1.")
    assert reply_for("conversation", context).count("Question:") == 3


def test_retries_are_counted_and_logged_below_warning_so_a_run_with_faults_stays_quiet(tmp_path, caplog):
    from llava_lite.coco import SymbolicContext
    from llava_lite.config import TeacherConfig
    from llava_lite.teachers import chat

    ctx = SymbolicContext(1, "1.png", 64, 64, ["Two shapes."], [])
    with FaultyChatServer(rotating_faults(["500", "429", "ok"]), retry_after_s=0) as server:
        teacher = TeacherConfig(kind="chat", base_url=server.base_url, model="m", chat_backoff_s=0.0, chat_timeout_s=5)
        with caplog.at_level(logging.INFO):
            result = chat.generate([ctx], tmp_path / "out.jsonl", teacher, progress=False)
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert sum(result.retried.values()) == len(retries) > 0 and all(r.levelno == logging.INFO for r in retries)
