"""The memory estimate printed before training, and the advice given instead of running out."""

import pytest
import torch

from llava_lite import memory
from llava_lite.train import set_trainable

from llava_fixtures import tiny_llava


def test_memory_estimate_names_the_setting_to_change_instead_of_running_out(tok, monkeypatch):
    model = tiny_llava(tok)
    set_trainable(model, 2)
    est = memory.estimate(model, batch_size=8, seq_len=128)
    assert est.weights > 0 and est.gradients > 0 and est.optimizer == pytest.approx(2 * est.gradients)
    assert memory.estimate(model, 8, 128, gradient_checkpointing=True).activations < est.activations
    monkeypatch.setattr(memory, "free_memory", lambda device: 1e6)
    with pytest.raises(MemoryError, match="gradient checkpointing.*halve the per-device batch.*LoRA"):
        memory.check(model, 8, 128, "fp32", False, torch.device("cpu"))


def test_only_what_trains_needs_gradients_and_optimizer_state(tok):
    model = tiny_llava(tok)
    set_trainable(model, 1)
    projector = sum(p.numel() for p in model.projector.parameters())
    stage1 = memory.estimate(model, 8, 128)
    assert stage1.gradients == 4 * projector and stage1.optimizer == 8 * projector
    assert stage1.weights == 4 * sum(p.numel() for p in model.parameters())
    mixed = memory.estimate(model, 8, 128, precision="bf16")
    assert mixed.optimizer == 12 * projector  # an fp32 master copy on top of the two moments
    set_trainable(model, 2)
    assert memory.estimate(model, 8, 128).gradients > stage1.gradients


def test_an_estimate_that_fits_passes_the_check(tok, monkeypatch):
    model = tiny_llava(tok)
    set_trainable(model, 1)
    monkeypatch.setattr(memory, "free_memory", lambda device: 1e12)
    est = memory.check(model, 8, 128, "fp32", False, torch.device("cpu"))
    assert est.fits() and "free" in est.report()
