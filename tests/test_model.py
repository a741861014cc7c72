"""The LLaVA model, the templates' loss masks, and the one training loop."""
import pytest
import torch

from llava_lite import conversation as conv
from llava_lite.data import Collator, encode_samples, padding_share, plan_batches
from llava_lite.train import TrainConfig, TrainingDiverged, latest_checkpoint, read_metrics, train

from llava_fixtures import NUM_IMAGE_TOKENS, fake_features, tiny_llava, tiny_tokenizer, world_samples

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def samples():
    return world_samples(40)[1]


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
    for s in (samples if template_name != "plain" else [s for s in samples if s["type"] == "caption"]):
        enc = template.encode(s["conversations"], s["id"])
        learned = [i for i, l in zip(enc.input_ids, enc.labels) if l != conv.IGNORE]
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


def test_overlong_sample_is_cut_at_a_turn_boundary_or_dropped_never_through_the_image(tok, samples):
    template = conv.get_template("chat", tok)
    s = next(s for s in samples if len(s["conversations"]) >= 8)
    full = template.encode(s["conversations"], s["id"])
    first_reply_end = next(i for i in range(len(full.labels)) if full.labels[i] != conv.IGNORE and full.labels[i + 1] == conv.IGNORE) + 1
    limit = first_reply_end + NUM_IMAGE_TOKENS - 1 + 2
    (ex,), stats = encode_samples([s], template, NUM_IMAGE_TOKENS, limit)
    assert stats["cut at a turn boundary"] == 1 and len(ex.enc) <= limit
    assert ex.enc.labels[-1] != conv.IGNORE  # ends on a reply
    examples, stats = encode_samples([s], template, NUM_IMAGE_TOKENS, NUM_IMAGE_TOKENS + 3)
    assert examples == [] and stats["dropped: too long"] == 1


def test_show_masked_marks_what_carries_no_loss(tok, samples):
    template = conv.get_template("chat", tok)
    s = next(s for s in samples if s["type"] == "exact")
    text = conv.show_masked(tok, template.encode(s["conversations"], s["id"]))
    q = s["conversations"][0]["value"].replace("<image>", "").strip()
    a = s["conversations"][1]["value"]
    masked = "".join(part.split("]]")[0] for part in text.split("[[")[1:])
    learned = [part.split("]]")[1].strip() for part in text.split("[[")[1:]]
    replies = [t["value"] for t in s["conversations"] if t["from"] == "gpt"]
    assert learned == [f"{r}<|end|>" for r in replies]
    assert q.split()[1] in masked and "<image>" in masked


def test_image_placeholders_and_features_must_agree(tok, samples):
    model = tiny_llava(tok)
    template = conv.get_template("chat", tok)
    examples, _ = encode_samples(samples[:3], template, NUM_IMAGE_TOKENS, 512)
    batch = Collator(tok.pad_token_id, features=fake_features)(examples)
    model(**{k: v for k, v in batch.items() if k != "labels"})  # agrees: fine
    with pytest.raises(ValueError, match=r"3 image\(s\) x 3 patch tokens = 9 features"):
        model(input_ids=batch["input_ids"], image_features=batch["image_features"][:, :3])
    with pytest.raises(ValueError, match="12 <image> slots"):
        model(input_ids=batch["input_ids"], image_features=batch["image_features"][:2])


def test_text_only_samples_and_padding_work_in_one_batch(tok, samples):
    model = tiny_llava(tok)
    template = conv.get_template("chat", tok)
    text_only = {"id": "t1", "conversations": [{"from": "human", "value": "How many sides has a square?"},
                                                {"from": "gpt", "value": "four"}]}
    examples, _ = encode_samples([samples[0], text_only, samples[1]], template, NUM_IMAGE_TOKENS, 512)
    batch = Collator(tok.pad_token_id, features=fake_features)(examples)
    assert batch["image_features"].shape == (2, NUM_IMAGE_TOKENS, 12)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                image_features=batch["image_features"])
    assert torch.isfinite(out.loss)
    # padding changes nothing for the real tokens: the text-only sample alone gives the same logits
    alone = Collator(tok.pad_token_id)([examples[1]])
    ref = model(input_ids=alone["input_ids"]).logits[0]
    n = len(examples[1].enc)
    assert torch.allclose(out.logits[1, :n], ref, atol=1e-5)


def _setup(tok, samples, stage=1):
    model = tiny_llava(tok)
    template = conv.get_template("plain" if stage == 1 else "chat", tok)
    data = [s for s in samples if (s["type"] == "caption") == (stage == 1)]
    examples, _ = encode_samples(data, template, NUM_IMAGE_TOKENS, 256)
    return model, examples, Collator(tok.pad_token_id, features=fake_features)


def test_stage1_trains_the_projector_and_leaves_everything_else_untouched(tok, samples, tmp_path):
    model, examples, collate = _setup(tok, samples)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, examples, collate, TrainConfig(stage=1, batch_size=8, max_steps=2, lr=1e-2), tmp_path, progress=False)
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == n.startswith("projector."), n


def test_resume_continues_exactly(tok, samples, tmp_path):
    cfg = TrainConfig(stage=2, batch_size=4, max_steps=6, lr=3e-3, grad_accum=2, save_every=3, log_every=1)
    a, examples, collate = _setup(tok, samples, stage=2)
    train(a, examples, collate, cfg, tmp_path / "straight", progress=False)
    b, _, _ = _setup(tok, samples, stage=2)
    half = TrainConfig(**{**cfg.__dict__, "max_steps": 6})
    # stop after 3 steps (as if killed after the checkpoint), then resume for the rest
    import llava_lite.train as T
    class Stop(Exception):
        pass
    orig = T.save_checkpoint
    def stop_after_first(*args, **kw):
        path = orig(*args, **kw)
        raise Stop
    T.save_checkpoint = stop_after_first
    try:
        with pytest.raises(Stop):
            train(b, examples, collate, half, tmp_path / "resumed", progress=False)
    finally:
        T.save_checkpoint = orig
    assert latest_checkpoint(tmp_path / "resumed").name == "checkpoint-3"
    c, _, _ = _setup(tok, samples, stage=2)  # a fresh process: new model, state from disk
    summary = train(c, examples, collate, half, tmp_path / "resumed", resume=True, progress=False)
    assert summary["started_at"] == 3
    for (n, p), (_, q) in zip(a.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), n
    steps = [m["step"] for m in read_metrics(tmp_path / "resumed")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_nan_loss_stops_with_step_and_sample_ids(tok, samples, tmp_path):
    model, examples, collate = _setup(tok, samples)
    with torch.no_grad():
        model.projector.linear_1.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"step 0: loss is nan on samples \['\d+-caption'"):
        train(model, examples, collate, TrainConfig(stage=1, batch_size=4, max_steps=2), tmp_path, progress=False)


def test_length_grouped_batches_waste_less_on_padding():
    lengths = [10 + (i * 37) % 200 for i in range(640)]
    plain = plan_batches(lengths, 16, 0, 0)
    grouped = plan_batches(lengths, 16, 0, 0, group_by_length=True)
    assert sorted(i for b in grouped for i in b) == sorted(i for b in plain for i in b)
    assert padding_share(grouped, lengths) < 0.5 * padding_share(plain, lengths)


def test_the_same_preset_always_starts_from_the_same_projector(tok):
    from llava_lite import pipeline
    from llava_lite.config import get_preset

    from transformers import LlamaConfig, LlamaForCausalLM

    class Tower:
        cache_key, width, num_patches = "t", 12, 4

    def lm():
        return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=4))
    cfg = get_preset("tiny")
    a = pipeline.build_llava(cfg, lm(), tok, Tower())
    torch.rand(100)  # whatever ran before does not matter
    b = pipeline.build_llava(cfg, lm(), tok, Tower())
    assert torch.equal(a.projector.linear_1.weight, b.projector.linear_1.weight)
    c = pipeline.build_llava(cfg, lm(), tok, Tower(), seed=1)
    assert not torch.equal(a.projector.linear_1.weight, c.projector.linear_1.weight)
