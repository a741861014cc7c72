"""How much memory will training take? An estimate printed before training starts, beside the
device's free memory, with the setting to change when it will not fit."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psutil
import torch

log = logging.getLogger(__name__)
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class Estimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    free: float | None
    trainable: int = 0  # parameters that train

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def fits(self) -> bool:
        return self.free is None or self.total < 0.9 * self.free

    def report(self) -> str:
        g = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"
        lines = [
            f"weights {g(self.weights)}, gradients {g(self.gradients)}, optimizer state {g(self.optimizer)}, "
            f"activations {g(self.activations)}: total {g(self.total)}; free {g(self.free) if self.free else 'unknown'}"
        ]
        return lines[0]


def free_memory(device: torch.device) -> float | None:
    if device.type == "meta":  # an estimate from shapes alone, for no device in particular
        return None
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    return float(psutil.virtual_memory().available)


def estimate(
    model,
    batch_size: int,
    seq_len: int,
    precision: str = "fp32",
    gradient_checkpointing: bool = False,
    device: torch.device | None = None,
) -> Estimate:
    """Weights at their dtype, gradients of what trains, AdamW's two fp32 moments (plus an fp32
    master copy under mixed precision), and the language model's activations per layer
    (about ``s*b*h*(34 + 5*a*s/h)`` bytes at 16 bits, after Korthikanti et al., 2022)."""
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    width = BYTES.get(precision, 4)
    grads = trainable * 4
    optim = trainable * 8 + (trainable * 4 if precision != "fp32" else 0)
    cfg = getattr(getattr(model, "lm", model), "config", None)
    h = getattr(cfg, "hidden_size", 0)
    layers = getattr(cfg, "num_hidden_layers", 0)
    heads = getattr(cfg, "num_attention_heads", 1)
    vocab = getattr(cfg, "vocab_size", 0)
    s, b = seq_len, batch_size
    per_layer = s * b * h * (34 + 5 * heads * s / max(1, h)) * width / 2
    acts = (2 * s * b * h * width * layers) if gradient_checkpointing else per_layer * layers
    acts += s * b * vocab * 4 * 2  # logits in fp32 and their gradient
    free = free_memory(device or torch.device("cpu"))
    return Estimate(float(weights), float(grads), float(optim), float(acts), free, trainable)


def check(model, batch_size: int, seq_len: int, precision: str, gradient_checkpointing: bool, device) -> Estimate:
    """Log the estimate; raise with advice when it clearly will not fit."""
    est = estimate(model, batch_size, seq_len, precision, gradient_checkpointing, device)
    log.info("memory estimate: %s", est.report())
    if not est.fits():
        advice = []
        if not gradient_checkpointing:
            advice.append("turn on gradient checkpointing (gradient_checkpointing=True)")
        advice.append(f"halve the per-device batch (now {batch_size}) and double grad_accum")
        advice.append("train LoRA adapters instead of the full language model (lora=True)")
        if precision == "fp32":
            advice.append("use bf16/fp16 mixed precision")
        raise MemoryError(
            f"training needs about {est.total / 2**30:.1f} GiB but {est.free / 2**30:.1f} GiB are free "
            f"({est.report()}). Try: " + "; or ".join(advice)
        )
    return est
