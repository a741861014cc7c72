"""The one training loop: what each stage trains, checkpoints that resume exactly and keep what
trained, a diverging loss that names its samples, and the learning-rate schedule."""

import math

import pytest
import torch
from safetensors.torch import load_file

import llava_lite.train as T
from llava_lite import conversation as conv
from llava_lite.data import Collator, encode_samples
from llava_lite.model import apply_lora
from llava_lite.train import TrainConfig, TrainingDiverged, latest_checkpoint, lr_factor, train

from llava_fixtures import NUM_IMAGE_TOKENS, fake_features, tiny_llava


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


class Stop(Exception):
    pass


def test_resume_continues_exactly(tok, samples, tmp_path, monkeypatch):
    cfg = TrainConfig(stage=2, batch_size=4, max_steps=6, lr=3e-3, grad_accum=2, save_every=3, log_every=1)
    a, examples, collate = _setup(tok, samples, stage=2)
    train(a, examples, collate, cfg, tmp_path / "straight", progress=False)
    b, _, _ = _setup(tok, samples, stage=2)
    # stop after 3 steps (as if killed after the checkpoint), then resume for the rest
    orig = T.save_checkpoint

    def stop_after_first(*args, **kw):
        orig(*args, **kw)
        raise Stop

    with monkeypatch.context() as m:
        m.setattr(T, "save_checkpoint", stop_after_first)
        with pytest.raises(Stop):
            train(b, examples, collate, cfg, tmp_path / "resumed", progress=False)
    assert latest_checkpoint(tmp_path / "resumed").name == "checkpoint-3"
    c, _, _ = _setup(tok, samples, stage=2)  # a fresh process: new model, state from disk
    summary = train(c, examples, collate, cfg, tmp_path / "resumed", resume=True, progress=False)
    assert summary["started_at"] == 3
    for (n, p), (_, q) in zip(a.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), n
    steps = [m["step"] for m in T.read_metrics(tmp_path / "resumed")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_nan_loss_stops_with_step_and_sample_ids(tok, samples, tmp_path):
    model, examples, collate = _setup(tok, samples)
    with torch.no_grad():
        model.projector.linear_1.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"step 0: loss is nan on samples \['\d+-caption'"):
        train(model, examples, collate, TrainConfig(stage=1, batch_size=4, max_steps=2), tmp_path, progress=False)


def test_lora_trains_adapters_and_projector_and_the_checkpoint_keeps_both(tok, samples, tmp_path):
    _, examples, collate = _setup(tok, samples, stage=2)
    model = apply_lora(tiny_llava(tok), r=4, alpha=8)
    groups = dict(T.set_trainable(model, 2))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or n.startswith("projector.") for n in names)
    assert any(n.startswith("projector.") for n in names) and len(groups["lm"]) > 0
    train(model, examples, collate, TrainConfig(stage=2, batch_size=8, max_steps=3, lr=1e-2), tmp_path, progress=False)
    saved = load_file(str(latest_checkpoint(tmp_path) / "trainable.safetensors"))
    assert set(saved) == set(names)
    fresh = apply_lora(tiny_llava(tok), r=4, alpha=8)
    trained = dict(model.named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in fresh.named_parameters() if n in saved)
    T.load_trained(fresh, latest_checkpoint(tmp_path))
    for n, p in fresh.named_parameters():  # everything: what trained from the checkpoint, the rest as built
        assert torch.equal(p, trained[n]), n


def _wider(tok):
    """The tiny LLaVA over 16-wide features instead of 12."""
    model = tiny_llava(tok)
    model.projector.linear_1 = torch.nn.Linear(16, 32)
    return model


def test_loading_a_checkpoint_into_the_wrong_model_names_the_weights(tok, samples, tmp_path):
    model, examples, collate = _setup(tok, samples)
    train(model, examples, collate, TrainConfig(stage=1, batch_size=8, max_steps=1), tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"projector.linear_1.weight has shape \(32, 12\)"):
        T.load_trained(_wider(tok), latest_checkpoint(tmp_path))
    with pytest.raises(ValueError, match="do not exist in this model"):
        T.load_trained(tiny_llava(tok, projector_type="linear"), latest_checkpoint(tmp_path))


def test_set_trainable_refuses_an_unknown_stage(tok):
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        T.set_trainable(tiny_llava(tok), 3)


# ------------------------------------------------------------------ the schedule
def _cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """A linear warmup, then a cosine from the peak to zero, written out on its own (the stage
    settings of docs/results.md were measured on this curve)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def test_warmup_rises_linearly_from_one_over_warmup_to_one():
    assert [lr_factor(s, 100, 10) for s in range(10)] == [(s + 1) / 10 for s in range(10)]
    assert lr_factor(0, 100, 10) == 1 / 10 and lr_factor(9, 100, 10) == 1.0
    assert lr_factor(10, 100, 10) == 1.0  # the cosine starts at the peak


@pytest.mark.parametrize("floor", [0.0, 0.1])
def test_cosine_falls_steadily_to_the_floor_at_the_last_step(floor):
    values = [lr_factor(s, 100, 10, floor=floor) for s in range(10, 101)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(floor, abs=1e-12) and min(values) >= floor - 1e-12
    assert lr_factor(55, 100, 10, floor=floor) == pytest.approx(floor + (1 - floor) * 0.5)  # half way: half down
    assert lr_factor(150, 100, 10, floor=floor) == pytest.approx(floor, abs=1e-12)  # past the end: stays there


def test_decay_from_holds_the_peak_until_then_and_decays_over_the_rest():
    assert [lr_factor(s, 100, 10, decay_from=60) for s in range(10)] == [(s + 1) / 10 for s in range(10)]
    assert all(lr_factor(s, 100, 10, decay_from=60) == 1.0 for s in range(10, 61))
    tail = [lr_factor(s, 100, 10, floor=0.2, decay_from=60) for s in range(60, 101)]
    assert all(a > b for a, b in zip(tail, tail[1:]))
    assert lr_factor(80, 100, 10, floor=0.2, decay_from=60) == pytest.approx(0.6)  # half way between 1 and 0.2
    assert tail[-1] == pytest.approx(0.2, abs=1e-12)


def test_with_no_floor_the_schedule_is_bitwise_a_plain_cosine_with_warmup():
    for total, warmup in ((6, 1), (100, 3), (2000, 60), (7, 7), (1, 1)):
        for step in range(total + 3):
            assert lr_factor(step, total, warmup) == _cosine_with_warmup(step, total, warmup), (step, total)
            assert lr_factor(step, total, warmup, floor=0) == _cosine_with_warmup(step, total, warmup)
