"""The chat teacher against ``transformers serve`` (transformers' own OpenAI-compatible server),
started by the test on 127.0.0.1 with a tiny random Llama saved first: the real protocol, offline.

A random model cannot follow the format, so every reply must end up in the failures file with its
raw text, and the request and token counts must match what the server did.
"""

import os
from pathlib import Path

import pytest

from llava_lite import jsonl
from llava_lite.config import TeacherConfig
from llava_lite.teachers import chat
from llava_lite.teachers.prompts import RESPONSE_TYPES, load_prompts

from serve_fixtures import transformers_serve
from test_chat_teacher import KEY, KEY_ENV, assert_key_nowhere, make_contexts

MAX_TOKENS = 12
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_chat_model(folder: Path):
    """A byte-level BPE tokenizer with a chat template and a one-layer random Llama, built offline."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [p.system for p in map(load_prompts, RESPONSE_TYPES)]
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=8192,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # never stop before max_tokens: every reply is cut off ("length") and its token count is known
    model.generation_config.min_new_tokens = 10 * MAX_TOKENS
    model.save_pretrained(folder)
    return tokenizer


@pytest.mark.slow
def test_transformers_serve_speaks_the_protocol_and_random_replies_become_failures_with_raw_text(tmp_path):
    model_dir = tmp_path / "tiny-chat-model"
    tokenizer = save_tiny_chat_model(model_dir)
    server_log = tmp_path / "serve.log"
    with transformers_serve(model_dir, server_log, env={KEY_ENV: KEY}) as url:
        contexts = make_contexts(2)
        out = tmp_path / "chat.jsonl"
        cfg = TeacherConfig(
            kind="chat",
            model=str(model_dir),
            base_url=f"{url}/v1",
            api_key_env=KEY_ENV,
            chat_max_tokens=MAX_TOKENS,
            chat_temperature=1.0,
            chat_concurrency=2,
            chat_timeout_s=30,
            chat_format_retries=1,
        )
        os.environ[KEY_ENV] = KEY
        try:
            stats = chat.generate(contexts, out, cfg, progress=False)
        finally:
            del os.environ[KEY_ENV]

    units = len(contexts) * len(RESPONSE_TYPES)
    attempts = 1 + cfg.chat_format_retries
    assert [r for _, r in jsonl.read_jsonl(out)] == []
    failures = [r for _, r in jsonl.read_jsonl(chat.failures_path_for(out))]
    assert len(failures) == units and len({r["id"] for r in failures}) == units
    for rec in failures:
        assert rec["reason"] == "malformed" and len(rec["attempts"]) == attempts
        assert all(isinstance(a["raw"], str) and "cut off at max_tokens" in a["error"] for a in rec["attempts"])
    assert stats.requests == stats.completions == units * attempts and stats.retried == {}
    # the server's own access log agrees
    assert server_log.read_text().count('"POST /v1/chat/completions HTTP/1.1" 200') == stats.requests
    assert stats.malformed_replies == units * attempts and stats.without_usage == 0
    assert stats.completion_tokens == units * attempts * MAX_TOKENS
    # the server counts the prompt as the chat template renders it
    expected_prompt = (
        sum(
            len(
                tokenizer.apply_chat_template(
                    load_prompts(t).messages(c.text()), add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
            for c in contexts
            for t in RESPONSE_TYPES
        )
        * attempts
    )
    assert stats.prompt_tokens == expected_prompt
    assert_key_nowhere(tmp_path)
