"""The conversation templates: loss labels built turn by turn, the chat template cut into pieces,
the roles template equal to the tiny LM's own chat template, and the errors that name the problem."""

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from llava_lite import conversation as conv

from llava_fixtures import tiny_tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _answer_tokens(tok, sample, template_name):
    """What must be learned: each reply's tokens (+ the end-of-turn marker), counted independently."""
    replies = [t["value"] for t in sample["conversations"] if t["from"] == "gpt"]
    if template_name == "plain":
        return len(tok.encode(replies[0] + tok.eos_token, add_special_tokens=False))
    end = "<|end|>" if "<|end|>" in tok.chat_template else "<|im_end|>\n"
    return sum(len(tok.encode(r + end, add_special_tokens=False)) for r in replies)


@pytest.mark.parametrize("template_name", ["plain", "chat", "chatml"])
def test_loss_falls_on_assistant_tokens_only_for_every_template(tok, samples, template_name):
    t = tok
    if template_name == "chatml":
        t = tiny_tokenizer()
        t.add_special_tokens({"additional_special_tokens": ["<image>", "<|im_start|>", "<|im_end|>"]})
        t.chat_template = CHATML
    template = conv.get_template("plain" if template_name == "plain" else "chat", t)
    multi = [s for s in samples if len(s["conversations"]) >= 6]
    assert multi, "the fixture must hold multi-turn samples"
    for s in samples if template_name != "plain" else [s for s in samples if s["type"] == "caption"]:
        enc = template.encode(s["conversations"], s["id"])
        learned = [i for i, lab in zip(enc.input_ids, enc.labels) if lab != conv.IGNORE]
        assert len(learned) == _answer_tokens(t, s, template_name), s["id"]
        # every learned run decodes to a reply (never a question, role header or <image>)
        text = t.decode(learned)
        assert "<image>" not in text and "?" not in text.replace("<|end|>", "")
        assert enc.labels[enc.image_positions[0]] == conv.IGNORE


def test_chat_template_pieces_equal_the_whole_rendering(tok, samples):
    template = conv.get_template("chat", tok)
    s = next(s for s in samples if len(s["conversations"]) >= 6)
    msgs = conv.to_messages(s["conversations"])
    assert "".join(p for p, _ in template.pieces(msgs)) == tok.apply_chat_template(msgs, tokenize=False)
    gen = "".join(p for p, _ in template.pieces(msgs[:1], generation=True))
    assert gen == tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)


def test_turns_that_do_not_alternate_are_rejected_with_the_sample_id(tok):
    template = conv.get_template("chat", tok)
    with pytest.raises(conv.TemplateError, match="sample s7: turns must alternate"):
        template.encode([{"from": "human", "value": "<image>\nhi"}, {"from": "human", "value": "again"}], "s7")


def test_show_masked_marks_what_carries_no_loss(tok, samples):
    template = conv.get_template("chat", tok)
    s = next(s for s in samples if s["type"] == "exact")
    text = conv.show_masked(tok, template.encode(s["conversations"], s["id"]))
    q = s["conversations"][0]["value"].replace("<image>", "").strip()
    masked = "".join(part.split("]]")[0] for part in text.split("[[")[1:])
    learned = [part.split("]]")[1].strip() for part in text.split("[[")[1:]]
    replies = [t["value"] for t in s["conversations"] if t["from"] == "gpt"]
    assert learned == [f"{r}<|end|>" for r in replies]
    assert q.split()[1] in masked and "<image>" in masked


# ------------------------------------------------------------------ the roles template
def test_roles_template_gives_the_ids_and_labels_of_the_tiny_lms_own_chat_template(tok, samples):
    roles, chat = conv.get_template("roles", tok), conv.get_template("chat", tok)
    multi = [s for s in samples if len(s["conversations"]) >= 4]
    assert len(multi) >= 5, "the fixture must hold multi-turn samples"
    for s in multi:
        turns = s["conversations"]
        mine, theirs = roles.encode(turns, s["id"]), chat.encode(turns, s["id"])
        assert mine.input_ids == theirs.input_ids and mine.labels == theirs.labels, s["id"]
        assert mine.image_positions == theirs.image_positions
        # and the whole Jinja rendering tokenised in one go reads the same ids
        rendered = tok.apply_chat_template(conv.to_messages(turns), tokenize=False)
        assert mine.input_ids == tok.encode(rendered, add_special_tokens=False), s["id"]
        for k in range(1, len(turns), 2):  # the prompt before every reply
            assert roles.prompt(turns[:k], s["id"]) == chat.prompt(turns[:k], s["id"]), (s["id"], k)


def test_roles_template_learns_each_reply_and_its_end_marker_only(tok, samples):
    roles = conv.get_template("roles", tok)
    s = next(s for s in samples if len(s["conversations"]) >= 6)
    enc = roles.encode(s["conversations"], s["id"])
    learned = [i for i, lab in zip(enc.input_ids, enc.labels) if lab != conv.IGNORE]
    assert learned == [
        t for r in s["conversations"][1::2] for t in tok.encode(r["value"] + conv.END, add_special_tokens=False)
    ]
    assert roles.prompt(s["conversations"][:1])[-1] == tok.convert_tokens_to_ids(conv.ASSISTANT)


def _word_tokenizer(special: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with the given special tokens (and none other than ``<unk>``)."""
    vocab = {w: i for i, w in enumerate(["<unk>", "hello", *special])}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": special})
    return fast


def test_roles_template_refuses_a_tokenizer_without_the_role_tokens_naming_them():
    with pytest.raises(conv.TemplateError, match="roles template needs") as e:
        conv.get_template("roles", _word_tokenizer(["<image>"]))
    assert all(t in str(e.value) for t in conv.ROLE_TOKENS)
    with pytest.raises(conv.TemplateError) as e:
        conv.get_template("roles", _word_tokenizer(["<image>", conv.USER, conv.ASSISTANT]))
    assert conv.END in str(e.value) and conv.USER not in str(e.value)
    conv.get_template("roles", _word_tokenizer(["<image>", *conv.ROLE_TOKENS]))  # all there: fine
