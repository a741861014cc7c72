"""The tiny backbones' tokenizers: the BPE keeps words whole and digits single, its chat template
and the roles template write the same tokens, and the shipped tokenizer is what the recipe makes."""

from __future__ import annotations

import json
import random

import pytest

from llava_lite.conversation import get_template
from llava_lite.lab.documents import reading_documents
from llava_lite.lab.lm import load_tiny_lm
from llava_lite.lab.tokenizers import EOS, SPECIAL_TOKENS, build_tokenizer, tokenize, tokenizer_corpus, train_tokenizer
from llava_lite.paths import PRETRAINED_DIR

SHIPPED_LM = PRETRAINED_DIR / "tiny-lm"


def test_tokenizer_keeps_words_whole_and_digits_single(small_tokenizer):
    tok, _ = small_tokenizer
    for special in SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id and len(tok.tokenize(special)) == 1
    pieces = tok.tokenize("red circle: [0.125, 0.250, 0.406, 0.531]\nWhat colour is the red circle?")
    # a word reads the same at the start of a line and inside a sentence
    assert pieces.count("Ġred") == 2 and pieces.count("Ġcircle") == 2, pieces
    digits = [p for p in pieces if p.isdigit()]
    assert all(len(p) == 1 for p in digits) and len(digits) == 16, pieces


def test_chat_template_renders_user_assistant_turns(small_tokenizer):
    tok, _ = small_tokenizer
    msgs = [
        {"role": "user", "content": "ctx\nWhat colour is the circle?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "How many squares are there?"},
        {"role": "assistant", "content": "two"},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == (
        "<|user|>ctx\nWhat colour is the circle?<|end|><|assistant|>red<|end|>"
        "<|user|>How many squares are there?<|end|><|assistant|>two<|end|>"
    )
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|end|><|assistant|>")


def _rendered(tok, messages, **kw) -> list[int]:
    ids = tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("which", ["trained here", "shipped"])
def test_roles_template_writes_the_tokens_the_tiny_lm_chat_template_renders(small_tokenizer, which):
    """The roles template (which pretraining and every evaluation use) and the tokenizer's own
    chat template (which a reader of the shipped files uses) give one token sequence."""
    tok, contexts = small_tokenizer
    if which == "shipped":
        _, tok = load_tiny_lm(SHIPPED_LM)
    template = get_template("roles", tok)
    docs = reading_documents(contexts[:40], random.Random(0), qa_per_doc=5, caption_share=0.2)
    assert any(len(d) == 2 for d in docs) and any(len(d) > 2 for d in docs)  # captions and questions
    for doc in docs:
        messages = [{"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]} for t in doc]
        assert template.encode(doc).input_ids == _rendered(tok, messages)
        assert template.prompt(doc[:1]) == _rendered(tok, messages[:1], add_generation_prompt=True)


@pytest.mark.slow
def test_the_shipped_tiny_lm_tokenizer_is_what_the_recipe_trains(tiny_pretrain):
    """The BPE of ``llava-lite backbones lm`` on the tiny preset's world, trained afresh on its
    first 5000 pretrain scenes, has exactly the shipped vocabulary and merges."""
    _, pretrain, _, _ = tiny_pretrain
    tok = train_tokenizer(tokenizer_corpus(pretrain[:5000], seed=0), vocab_size=512)
    shipped = json.loads((SHIPPED_LM / "tokenizer.json").read_text())
    assert json.loads(tok.backend_tokenizer.to_str())["model"] == shipped["model"]


def test_clip_word_tokenizer_ends_each_text_at_eos_and_pads_to_the_context():
    tok = build_tokenizer(["A red circle.", "Two blue squares and a red circle."])
    ids = tokenize(tok, ["a RED circle.", "two blue squares and a red circle.", "a green circle"], context_length=8)
    assert ids.shape == (3, 8)
    eos = tok.convert_tokens_to_ids(EOS)
    assert (ids == eos).sum(1).tolist() == [1, 1, 1]
    assert ids[1, -1] == eos  # a text cut to the context still ends at <eos>, where the text embedding is pooled
    assert ids[0, :5].tolist() == tok("a red circle .").input_ids and (ids[0, 5:] == tok.pad_token_id).all()
    assert tok.unk_token_id in ids[2].tolist()  # "green" was never seen
