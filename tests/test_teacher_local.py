"""The local teacher: the chat teacher's prompts answered by a small random-weight chat model
(a Llama saved in the hub's cache layout with the tiny LM's tokenizer and chat template), on the
CPU, through the same parsing, failure records and resumable JSONL as the endpoint teacher."""

import logging

import pytest
import torch
from test_hub import _hub_folder
from transformers import LlamaConfig, LlamaForCausalLM

from llava_lite import cli, hub, jsonl, world
from llava_lite.config import TeacherConfig, WorldConfig
from llava_lite.paths import Layout
from llava_lite.teachers import chat
from llava_lite.teachers.local import LocalChatModel
from llava_lite.teachers.prompts import RESPONSE_TYPES, load_prompts

from llava_fixtures import tiny_tokenizer
from test_chat_teacher import make_contexts

REPO = "test-org/tiny-chat-teacher"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A hub cache holding one tiny random chat model under ``REPO``."""
    cache = tmp_path_factory.mktemp("hub")
    tok = tiny_tokenizer()
    assert tok.chat_template  # the shipped tokenizer carries its chat template
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    folder = _hub_folder(cache, REPO)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return cache


@pytest.fixture
def offline(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the test's replies are the CPU's
    return hub_cache


def local_teacher(**changes) -> TeacherConfig:
    settings = dict(kind="local", model=REPO, chat_temperature=0, chat_max_tokens=6, local_batch_size=4)
    return TeacherConfig(**{**settings, **changes})


def raw_replies(path) -> dict[str, str]:
    return {rec["id"]: rec["attempts"][-1]["raw"] for _, rec in jsonl.read_jsonl(path)}


def test_local_teacher_replies_to_every_unit_and_records_refused_replies_as_failures(offline, tmp_path):
    contexts = make_contexts(3)
    out = tmp_path / "chat.jsonl"
    stats = chat.generate(contexts, out, local_teacher(), progress=False)
    units = len(contexts) * len(RESPONSE_TYPES)
    assert stats.units == units and stats.requests == units and stats.completions == units
    assert stats.samples + stats.failures == units
    # a random model's replies do not parse: each is a failure, counted as the endpoint teacher counts it
    assert stats.failures == units and stats.malformed_replies == units
    failures = [rec for _, rec in jsonl.read_jsonl(chat.failures_path_for(out))]
    assert sorted(r["id"] for r in failures) == sorted(f"{c.image_id}-{t}" for c in contexts for t in RESPONSE_TYPES)
    for rec in failures:
        assert rec["reason"] == "malformed" and len(rec["attempts"]) == 1  # greedy: asking again is pointless
        assert rec["attempts"][0]["raw"].strip() and rec["made_with"]
    assert stats.prompt_tokens > 1000 * units  # the few-shot prompt really went in
    assert 0 < stats.completion_tokens <= 6 * units

    again = chat.generate(contexts, out, local_teacher(), progress=False)  # resume: nothing asked twice
    assert again.already_failed == units and again.requests == 0 and again.failures == 0


def test_batched_greedy_replies_equal_one_at_a_time(offline, tmp_path, caplog):
    contexts = make_contexts(3)
    one = chat.generate(contexts, tmp_path / "one.jsonl", local_teacher(local_batch_size=1), progress=False)
    with caplog.at_level(logging.DEBUG, logger="llava_lite.teachers.local"):
        many = chat.generate(contexts, tmp_path / "many.jsonl", local_teacher(local_batch_size=9), progress=False)
    batches = [int(m.rsplit(" ", 1)[1]) for m in caplog.messages if m.startswith("local teacher: a batch of")]
    assert sum(batches) == 9 and max(batches) > 1  # the worker threads' requests were answered together
    assert one.completions == many.completions == 9
    assert raw_replies(tmp_path / "one.failures.jsonl") == raw_replies(tmp_path / "many.failures.jsonl")


def test_a_batch_of_different_lengths_matches_each_prompt_alone(offline):
    model = LocalChatModel(REPO, batch_size=3, temperature=0, max_tokens=5)
    prompts = [load_prompts(t).messages(c.text()) for t, c in zip(RESPONSE_TYPES, make_contexts(3))]
    together = model.generate(prompts)
    alone = [model.generate([p])[0] for p in prompts]
    lengths = {c.usage["prompt_tokens"] for c in together}
    assert len(lengths) == 3  # left padding really happened
    assert [c.content for c in together] == [c.content for c in alone]
    assert all(c.finish_reason == "length" and c.usage["completion_tokens"] == 5 for c in together)


def test_a_model_neither_cached_nor_reachable_is_named(offline, tmp_path):
    with pytest.raises(hub.ModelUnavailable, match="test-org/missing"):
        chat.generate(make_contexts(1), tmp_path / "x.jsonl", local_teacher(model="test-org/missing"), progress=False)


def test_cli_instruct_with_a_local_teacher_writes_the_chat_files(offline, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_LITE_OUTPUTS", str(tmp_path))
    layout = Layout.for_preset("tiny")
    world.generate(WorldConfig(splits={"train": 2}), layout.world, progress=False)
    argv = ["instruct", "--teacher", "local", "--model", REPO, "--split", "train", "--limit", "1",
            "--temperature", "0", "--max-tokens", "4", "--batch-size", "3"]  # fmt: skip
    assert cli.main(argv) == 0
    got = raw_replies(layout.instruct / "chat_train.failures.jsonl")
    assert len(got) == 3 and all(reply.strip() for reply in got.values())
    assert cli.main(["instruct", "--teacher", "local", "--split", "train"]) == 1  # no --model: a clear error


def test_a_local_run_and_an_endpoint_run_of_the_same_model_are_different_data():
    messages = [{"role": "user", "content": "Describe the image."}]
    endpoint = TeacherConfig(kind="chat", model="some/model", seed=3)
    local = TeacherConfig(kind="local", model="some/model", seed=3)
    assert chat.fingerprint(messages, endpoint, "a.png") != chat.fingerprint(messages, local, "a.png")
    # an endpoint's fingerprint is the one the code before the backend key gave
    assert chat.fingerprint(messages, endpoint, "a.png") == "0885dabffab7b8cf"
