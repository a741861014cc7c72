"""The misbehaving chat server's plans: which fault each request of each context meets."""

import pytest

from llava_lite.teachers.testing_server import FAULTS, rotating_faults

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
