"""Samples to examples and batches: fitting to the length limit, the batch plan, the collator."""

import pytest

from llava_lite import conversation as conv
from llava_lite.data import Collator, encode_samples, padding_share, plan_batches

from llava_fixtures import NUM_IMAGE_TOKENS, fake_features


def test_overlong_sample_is_cut_at_a_turn_boundary_or_dropped_never_through_the_image(tok, samples):
    template = conv.get_template("chat", tok)
    s = next(s for s in samples if len(s["conversations"]) >= 8)
    full = template.encode(s["conversations"], s["id"])
    first_reply_end = (
        next(i for i in range(len(full.labels)) if full.labels[i] != conv.IGNORE and full.labels[i + 1] == conv.IGNORE)
        + 1
    )
    limit = first_reply_end + NUM_IMAGE_TOKENS - 1 + 2
    (ex,), stats = encode_samples([s], template, NUM_IMAGE_TOKENS, limit)
    assert stats["cut at a turn boundary"] == 1 and len(ex.enc) <= limit
    assert ex.enc.labels[-1] != conv.IGNORE  # ends on a reply
    examples, stats = encode_samples([s], template, NUM_IMAGE_TOKENS, NUM_IMAGE_TOKENS + 3)
    assert examples == [] and stats["dropped: too long"] == 1


def test_image_and_image_token_must_agree_and_the_error_names_the_sample(tok, samples):
    template = conv.get_template("chat", tok)
    s = next(s for s in samples if s.get("image"))
    no_token = {
        **s,
        "id": "x1",
        "conversations": [dict(t, value=t["value"].replace("<image>", "").strip()) for t in s["conversations"]],
    }
    with pytest.raises(conv.TemplateError, match="sample x1: has an image but 0 <image> tokens"):
        encode_samples([no_token], template, NUM_IMAGE_TOKENS, 512)
    no_image = {k: v for k, v in s.items() if k != "image"} | {"id": "x2"}
    with pytest.raises(conv.TemplateError, match="sample x2: has <image> in its text but no image"):
        encode_samples([no_image], template, NUM_IMAGE_TOKENS, 512)


def test_each_image_grows_to_one_placeholder_per_patch_token_with_no_loss(tok, samples):
    template = conv.get_template("chat", tok)
    (ex,), _ = encode_samples(samples[:1], template, NUM_IMAGE_TOKENS, 512)
    enc = template.encode(samples[0]["conversations"], samples[0]["id"])
    image_id = tok.convert_tokens_to_ids("<image>")
    assert ex.enc.input_ids.count(image_id) == NUM_IMAGE_TOKENS and len(ex.enc) == len(enc) + NUM_IMAGE_TOKENS - 1
    assert all(ex.enc.labels[i] == conv.IGNORE for i, t in enumerate(ex.enc.input_ids) if t == image_id)
    assert [lab for lab in ex.enc.labels if lab != conv.IGNORE] == [lab for lab in enc.labels if lab != conv.IGNORE]


def test_length_grouped_batches_waste_less_on_padding():
    lengths = [10 + (i * 37) % 200 for i in range(640)]
    plain = plan_batches(lengths, 16, 0, 0)
    grouped = plan_batches(lengths, 16, 0, 0, group_by_length=True)
    assert sorted(i for b in grouped for i in b) == sorted(i for b in plain for i in b)
    assert padding_share(grouped, lengths) < 0.5 * padding_share(plain, lengths)


def test_the_batch_plan_is_fixed_by_seed_and_epoch():
    lengths = list(range(10, 110))
    assert plan_batches(lengths, 8, 3, 7) == plan_batches(lengths, 8, 3, 7)
    assert plan_batches(lengths, 8, 3, 7) != plan_batches(lengths, 8, 4, 7) != plan_batches(lengths, 8, 3, 8)
    assert all(len(b) == 8 for b in plan_batches(lengths, 8, 0, 0))  # the short last batch is dropped


def test_collator_pads_with_no_loss_and_stacks_the_features_of_the_samples_with_images(tok, samples):
    template = conv.get_template("chat", tok)
    text_only = {
        "id": "t1",
        "conversations": [{"from": "human", "value": "How many sides has a square?"}, {"from": "gpt", "value": "four"}],
    }
    examples, _ = encode_samples([samples[0], text_only], template, NUM_IMAGE_TOKENS, 512)
    for side in ("right", "left"):
        batch = Collator(tok.pad_token_id, features=fake_features, padding_side=side)(examples)
        n = len(examples[1].enc)
        real = slice(0, n) if side == "right" else slice(batch["input_ids"].shape[1] - n, None)
        assert batch["input_ids"][1, real].tolist() == examples[1].enc.input_ids
        assert batch["attention_mask"][1].sum() == n and batch["attention_mask"][1, real].all()
        assert (batch["labels"][1][batch["attention_mask"][1] == 0] == conv.IGNORE).all()
        assert batch["image_features"].shape[0] == 1 and batch["sample_ids"] == [samples[0]["id"], "t1"]
    with pytest.raises(ValueError, match="neither a feature cache nor an image loader"):
        Collator(tok.pad_token_id)(examples)
