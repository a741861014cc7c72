"""Batched greedy replies: left-padded batches that answer as one prompt at a time would, the token
that ends a turn, the prompt of one question, eval mode only for the block that asks, and a
streamed reply that hands over whole characters."""

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from llava_lite import conversation as conv
from llava_lite import evaluate as ev
from llava_lite.generate import evaluating, greedy_replies, question_prompt, stop_id, stream_reply

from llava_fixtures import NUM_IMAGE_TOKENS, fake_features


def test_batched_left_padded_generation_equals_one_at_a_time(exact_setup):
    tok, model, samples = exact_setup
    template = conv.get_template("chat", tok)
    items = ev.exact_items(samples)[:12]
    batched = ev.ask_llava(model, template, tok, items, fake_features, batch_size=12)
    single = [ev.ask_llava(model, template, tok, [it], fake_features, batch_size=1)[0] for it in items]
    assert batched == single
    blind = ev.ask_llava(model, template, tok, items, None, batch_size=5, blind=True)
    assert len(blind) == len(items)


STOP, PAD = 99, 0


def _echo_generate(calls):
    """A stand-in ``generate``: each row's reply is its real prompt tokens plus 10, then the stop token
    and one more token; records what it was given."""

    def generate(input_ids, attention_mask, max_new_tokens, **kw):
        calls.append({"ids": input_ids.clone(), "mask": attention_mask.clone(), **kw})
        rows = [[t + 10 for t in ids[mask.bool()].tolist()] + [STOP, 7] for ids, mask in zip(input_ids, attention_mask)]
        width = max(map(len, rows))
        return torch.tensor([r + [PAD] * (width - len(r)) for r in rows])

    return generate


def test_greedy_replies_left_pad_each_batch_and_come_back_in_the_prompts_order():
    prompts = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 1], [2]]
    calls = []
    replies = greedy_replies(
        _echo_generate(calls),
        prompts,
        PAD,
        STOP,
        lambda t: " ".join(map(str, t)),
        batch_size=2,
        extras=lambda idx: {"which": idx},
    )
    assert replies == [" ".join(str(t + 10) for t in p) for p in prompts]  # in order, cut before the stop token
    assert [c["which"] for c in calls] == [[1, 4], [2, 0], [3]]  # batched shortest first
    for c in calls:
        for row, mask, i in zip(c["ids"], c["mask"], c["which"]):
            n = len(prompts[i])
            assert row[-n:].tolist() == prompts[i] and mask[-n:].all() and not mask[:-n].any()  # left padded
            assert (row[:-n] == PAD).all()
        assert c["eos_token_id"] == STOP and c["pad_token_id"] == PAD and c["do_sample"] is False


def test_greedy_replies_drop_the_prompt_when_generate_returns_it():
    def generate(input_ids, attention_mask, max_new_tokens, **kw):
        return torch.cat([input_ids, torch.full((len(input_ids), 2), 42), torch.full((len(input_ids), 1), STOP)], 1)

    assert greedy_replies(generate, [[1, 2], [3]], PAD, STOP, str, returns_prompt=True) == ["[42, 42]", "[42, 42]"]


def test_question_prompt_holds_one_slot_per_patch_token_and_ends_on_the_assistants_opening(exact_setup):
    tok, model, _ = exact_setup
    template = conv.get_template("chat", tok)
    ids = question_prompt(model, template, "What colour is the circle?")
    assert ids.count(model.image_token_id) == NUM_IMAGE_TOKENS
    assert ids[-1] == tok.convert_tokens_to_ids(conv.ASSISTANT)
    blind = question_prompt(model, template, "What colour is the circle?", image=False)
    assert model.image_token_id not in blind and blind[-1] == ids[-1]
    asked = "What colour is the circle?<|end|><|assistant|>"
    assert tok.decode(ids).endswith(asked) and tok.decode(blind).endswith(asked)
    assert tok.decode(blind).startswith("<|user|>") and tok.decode(ids).startswith("<|user|><image>")


def _tokenizer(tokens: list[str]) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", "hello", *tokens])}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>", eos_token="</s>"
    )
    if tokens:
        fast.add_special_tokens({"additional_special_tokens": tokens})
    return fast


@pytest.mark.parametrize("end", ["<|end|>", "<|im_end|>", "<|eot_id|>"])
def test_stop_id_is_the_token_that_ends_an_assistant_turn(end):
    tok = _tokenizer(["<|user|>", end])
    assert stop_id(tok) == tok.convert_tokens_to_ids(end) != tok.eos_token_id


def test_stop_id_is_eos_when_no_end_of_turn_token_exists(exact_setup):
    tok = _tokenizer([])
    assert stop_id(tok) == tok.eos_token_id == 1
    shipped = exact_setup[0]
    assert stop_id(shipped) == shipped.convert_tokens_to_ids("<|end|>")


def test_evaluating_puts_the_model_in_eval_mode_and_restores_its_mode_even_on_error():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train()
    with pytest.raises(RuntimeError, match="inside"):
        with evaluating(model) as m:
            assert m is model and not model.training and not model[1].training
            raise RuntimeError("inside")
    assert model.training and model[1].training
    model.eval()
    with evaluating(model):
        pass
    assert not model.training  # a model in eval mode stays there


def test_stream_reply_hands_over_whole_characters_until_the_stop_token_and_the_pieces_make_the_reply():
    reply = "héllo, wörld"
    tokens = [*reply.encode("utf-8"), STOP, 33]  # one byte a token: é and ö arrive in two halves

    def generate(input_ids, attention_mask, max_new_tokens, streamer, **kw):
        streamer.put(input_ids)  # the prompt comes first, as transformers' generate hands it over
        for t in tokens:
            streamer.put(torch.tensor([t]))
        streamer.end()
        return torch.tensor([tokens])

    pieces = []
    got = stream_reply(
        generate, [5, 6], STOP, lambda t: bytes(t).decode("utf-8", errors="replace"), on_text=pieces.append
    )
    assert got == reply and "".join(pieces) == reply
    assert "é" in pieces and "ö" in pieces and not any("\ufffd" in p for p in pieces)  # never half a letter


def test_stream_reply_refuses_settings_that_mean_nothing():
    for bad in ({"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            stream_reply(lambda **kw: None, [1], STOP, str, **bad)
