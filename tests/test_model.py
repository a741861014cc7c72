"""The LLaVA model: image tokens spliced where <image> stands, text-only batches, the one token loss,
and LoRA adapters folded back into the weights."""

import pytest
import torch
import torch.nn.functional as F

from llava_lite import conversation as conv
from llava_lite.data import Collator, encode_samples
from llava_lite.model import apply_lora, merge_lora, token_loss

from llava_fixtures import NUM_IMAGE_TOKENS, fake_features, tiny_llava


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


def test_projected_patches_land_in_the_image_slots_in_order(tok, samples):
    model = tiny_llava(tok)
    examples, _ = encode_samples(samples[:2], conv.get_template("chat", tok), NUM_IMAGE_TOKENS, 512)
    batch = Collator(tok.pad_token_id, features=fake_features)(examples)
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], batch["image_features"])  # [B, T, D]
        plain = model.lm.get_input_embeddings()(batch["input_ids"])
        proj = model.projector(batch["image_features"])  # [N, P, D]
    slots = batch["input_ids"] == model.image_token_id
    torch.testing.assert_close(embeds[slots], proj.reshape(-1, proj.shape[-1]))
    torch.testing.assert_close(embeds[~slots], plain[~slots])


def test_text_only_samples_and_padding_work_in_one_batch(tok, samples):
    model = tiny_llava(tok)
    template = conv.get_template("chat", tok)
    text_only = {
        "id": "t1",
        "conversations": [{"from": "human", "value": "How many sides has a square?"}, {"from": "gpt", "value": "four"}],
    }
    examples, _ = encode_samples([samples[0], text_only, samples[1]], template, NUM_IMAGE_TOKENS, 512)
    batch = Collator(tok.pad_token_id, features=fake_features)(examples)
    assert batch["image_features"].shape == (2, NUM_IMAGE_TOKENS, 12)
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
        image_features=batch["image_features"],
    )
    assert torch.isfinite(out.loss)
    # padding changes nothing for the real tokens: the text-only sample alone gives the same logits
    alone = Collator(tok.pad_token_id)([examples[1]])
    ref = model(input_ids=alone["input_ids"]).logits[0]
    n = len(examples[1].enc)
    assert torch.allclose(out.logits[1, :n], ref, atol=1e-5)


# ------------------------------------------------------------------ the token loss
def _logits_and_labels(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 17, generator=g).to(dtype)  # [B, T, V]
    labels = torch.randint(0, 17, (3, 9), generator=g)
    labels[0, :4] = conv.IGNORE  # a prompt
    labels[1, 6:] = conv.IGNORE  # padding
    labels[2, ::2] = conv.IGNORE
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_summed_token_loss_is_exactly_the_shifted_cross_entropy_in_fp32(dtype):
    logits, labels = _logits_and_labels(dtype)
    shifted = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    got = token_loss(logits, labels, reduction="sum")
    assert got.dtype == torch.float32 and torch.equal(got, shifted)


def test_mean_token_loss_is_the_sum_over_the_learned_tokens():
    logits, labels = _logits_and_labels()
    learned = int((labels[:, 1:] != conv.IGNORE).sum())
    assert 0 < learned < labels[:, 1:].numel()
    torch.testing.assert_close(token_loss(logits, labels), token_loss(logits, labels, reduction="sum") / learned)


def test_weighted_token_loss_is_the_weighted_mean_of_each_tokens_loss():
    logits, labels = _logits_and_labels()
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(1))
    weights[0, 5:7] = 0.0  # not learned
    weights[labels == conv.IGNORE] = 0.0  # as a caller weighs the tokens it masks
    num = den = 0.0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):  # position t predicts token t + 1
            w = float(weights[b, t + 1])
            if w == 0:
                continue
            nll = -torch.log_softmax(logits[b, t].double(), dim=-1)[labels[b, t + 1]].item()
            num, den = num + w * nll, den + w
    assert token_loss(logits, labels, weights=weights).item() == pytest.approx(num / den, rel=1e-5)


def test_token_loss_ignores_what_is_not_learned():
    logits, labels = _logits_and_labels()
    base = {r: token_loss(logits, labels, reduction=r) for r in ("sum", "mean")}
    moved = logits.clone()
    moved[:, -1] += 100  # the last position predicts nothing
    ignored = torch.zeros_like(labels, dtype=torch.bool)
    ignored[:, :-1] = labels[:, 1:] == conv.IGNORE  # positions whose target is -100
    moved[ignored] = torch.randn(int(ignored.sum()), logits.shape[-1]) * 50
    relabelled = labels.clone()
    relabelled[:, 0] = 3  # the first token is never a target
    for r, value in base.items():
        assert torch.equal(token_loss(moved, relabelled, reduction=r), value), r
    counted = moved.clone()
    counted[~ignored & (torch.arange(labels.shape[1]) < labels.shape[1] - 1)] += torch.randn(logits.shape[-1]) * 5
    assert not torch.equal(token_loss(counted, labels, reduction="sum"), base["sum"])


# ------------------------------------------------------------------ LoRA
def test_merging_lora_gives_an_ordinary_model_with_the_same_outputs(tok, samples):
    model = apply_lora(tiny_llava(tok), r=4, alpha=8)
    assert any("lora_" in n for n, _ in model.named_parameters())
    with torch.no_grad():  # adapters as if trained (B starts at zero, which would make merging trivial)
        g = torch.Generator().manual_seed(0)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    examples, _ = encode_samples(samples[:4], conv.get_template("chat", tok), NUM_IMAGE_TOKENS, 512)
    batch = Collator(tok.pad_token_id, features=fake_features)(examples)
    kw = dict(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], image_features=batch["image_features"]
    )
    with torch.no_grad():
        before = model(**kw).logits
        assert not torch.allclose(before, tiny_llava(tok)(**kw).logits, atol=1e-3)  # the adapters do something
        merged = merge_lora(model)
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        assert torch.allclose(merged(**kw).logits, before, atol=1e-4)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        merge_lora(tiny_llava(tok))
