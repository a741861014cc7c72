"""One training loop for both stages, on ``accelerate``.

What is trained is decided by the stage: stage 1 the projector alone (from the feature cache,
no vision forward), stage 2 projector + language model (vision frozen). AdamW, cosine schedule
with warmup, gradient clipping and accumulation, mixed precision where the device has it, a tqdm
bar with loss and samples/s, metrics as JSONL, checkpoints that resume exactly.

The loss of an optimizer step is the mean over *every* learned token of the global batch (all
micro-batches, all processes): each process sums its tokens' losses and divides by the global
count, which it can compute locally from the batch plan. So 2 processes and 1 process with the
same global batch take the same step.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import io, jsonl, memory
from .config import TrainConfig
from .conversation import IGNORE
from .data import Collator, Example, padding_share, plan_batches
from .model import LlavaLite, token_loss

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """A NaN or infinite loss; the message names the step and the batch's sample ids."""


# ------------------------------------------------------------------ what trains
def set_trainable(model: LlavaLite, stage: int) -> list[tuple[str, list[torch.nn.Parameter]]]:
    """Freeze by stage; returns the named parameter groups that train (``projector``, ``lm``)."""
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    groups = [("projector", list(model.projector.parameters()))]
    if stage == 2:
        lm_params = (
            [p for n, p in model.lm.named_parameters() if "lora_" in n]
            if _is_peft(model.lm)
            else list(model.lm.parameters())
        )
        for p in lm_params:
            p.requires_grad_(True)
        groups.append(("lm", lm_params))
    elif stage != 1:
        raise ValueError(f"stage must be 1 or 2, not {stage!r}")
    return groups


def _is_peft(lm) -> bool:
    return hasattr(lm, "peft_config")


def trainable_state(model: LlavaLite) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.0, decay_from: int | None = None) -> float:
    """The learning-rate schedule, as a factor of the peak rate, for step ``step`` of ``total``.

    A linear warmup over ``warmup`` steps, then a cosine from 1 down to ``floor``. The cosine
    starts when the warmup ends, or at step ``decay_from``, holding the peak until then (warmup,
    stable, decay). Both training stages and the tiny backbones' pretraining use it."""
    if step < warmup:
        return (step + 1) / warmup
    if decay_from is not None and step < decay_from:
        return 1.0
    start = warmup if decay_from is None else decay_from
    progress = (step - start) / max(1, total - start)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cosine if floor == 0 else floor + (1 - floor) * cosine


def pick_precision(requested: str, device: torch.device) -> str:
    """``auto``: bf16 on a GPU that has it, else fp16 on a GPU, else fp32 (CPU).

    fp32 on the CPU is measured, not assumed: on the project's AVX512-BF16 CPU bf16 autocast ran a
    tiny stage-2 step at 0.96x the speed, and 200 steps took 51 s against 47 s for the same
    held-out loss (``benchmarks/precision_bench.py``, ``benchmarks/RESULTS.md``)."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def make_accelerator(precision: str = "auto"):
    """An ``accelerate.Accelerator`` for this machine: the GPU when there is one, mixed precision as
    :func:`pick_precision` decides. Under ``torchrun`` / ``accelerate launch`` it joins the process group."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = pick_precision(precision, torch.device(device_type))
    return Accelerator(cpu=device_type == "cpu", mixed_precision="no" if chosen == "fp32" else chosen)


# ------------------------------------------------------------------ checkpoints
def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(out_dir: Path, step: int, model: LlavaLite, optimizer, cfg: TrainConfig, keep: int) -> Path:
    """``out_dir/checkpoint-<step>/``: trained weights (safetensors), model config, optimizer,
    schedule position and RNG state; written to a temporary folder, then renamed."""
    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    model.config.save(tmp)
    torch.save(
        {"step": step, "optimizer": optimizer.state_dict(), "rng": _rng_state(), "train_config": asdict(cfg)},
        tmp / "train_state.pt",
    )
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    io.write_json(out_dir / "latest.json", {"step": step, "path": final.name})
    for old in sorted(out_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = Path(out_dir) / "latest.json"
    if not pointer.exists():
        return None
    return Path(out_dir) / io.read_json(pointer)["path"]


def load_trained(model: LlavaLite, ckpt: Path) -> None:
    """Put a checkpoint's trained weights into ``model`` (missing or unexpected names are errors)."""
    state = load_file(str(Path(ckpt) / "trainable.safetensors"))
    own = dict(model.named_parameters())
    unknown = [k for k in state if k not in own]
    if unknown:
        raise ValueError(f"{ckpt}: weights {unknown[:5]} do not exist in this model")
    with torch.no_grad():
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise ValueError(f"{ckpt}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
            own[k].copy_(v)


# ------------------------------------------------------------------ the loop
def _token_loss_sum(model: LlavaLite, batch: dict, right_padded: bool) -> torch.Tensor:
    """The summed token loss of one batch. A right-padded batch goes without its attention mask:
    causal attention never looks right, so a real token never sees the padding after it, and the
    padding's own outputs carry no loss (the same step, and as fast: ``benchmarks/loop_bench.py``)."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=None if right_padded else batch["attention_mask"],
        image_features=batch.get("image_features"),
        pixel_values=batch.get("pixel_values"),
        sample_ids=batch["sample_ids"],
    )
    return token_loss(out.logits, batch["labels"], reduction="sum")


def _resume(out_dir: Path, model: LlavaLite, optimizer, total: int) -> int:
    """Weights, optimizer state and RNG state from the run's latest checkpoint; the step to go on from."""
    ckpt = latest_checkpoint(out_dir)
    if ckpt is None:
        return 0
    load_trained(model, ckpt)
    state = torch.load(ckpt / "train_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    log.info("resuming from %s (step %d of %d)", ckpt, state["step"], total)
    return state["step"]


def _accumulate(
    model,
    accelerator,
    collator: Collator,
    examples: Sequence[Example],
    micro: list[list[int]],
    n_tokens: int,
    step: int,
    out_dir: Path,
) -> torch.Tensor:
    """Forward and backward over the micro-batches of one optimizer step (this process's share of
    each); returns the summed token loss. The loss is divided by the global batch's learned tokens."""
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    right_padded = getattr(collator, "side", "right") == "right"
    step_loss = torch.zeros((), device=device)
    for m, idx in enumerate(micro):
        batch = collator([examples[i] for i in idx[rank::world]])  # this process's share of the micro-batch
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        ctx = accelerator.no_sync(model) if m < len(micro) - 1 else nullcontext()
        with ctx, accelerator.autocast():
            loss_sum = _token_loss_sum(model, batch, right_padded)
            loss = loss_sum * world / max(1, n_tokens)  # DDP averages over processes
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"step {step}: loss is {loss.item()} on samples {batch['sample_ids']}; the last good checkpoint "
                f"is {latest_checkpoint(out_dir)} (lower the learning rate or check these samples)"
            )
        accelerator.backward(loss)
        step_loss += loss_sum.detach()
    return step_loss


def _optimizer(model: LlavaLite, examples: Sequence[Example], cfg: TrainConfig, accelerator):
    """What the stage trains, the memory estimate checked against the device, and AdamW over the
    trained groups (the projector's learning rate and the language model's). Returns
    ``(optimizer, precision, estimate)``."""
    groups = set_trainable(model, cfg.stage)
    if cfg.gradient_checkpointing:
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    precision = "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision
    per_device = cfg.batch_size // (accelerator.num_processes * cfg.grad_accum)
    longest = max(len(e.enc) for e in examples)
    est = memory.check(model, per_device, longest, precision, cfg.gradient_checkpointing, accelerator.device)
    lrs = {"projector": cfg.lr, "lm": cfg.lm_lr or cfg.lr}
    params = [{"params": ps, "lr": lrs[name], "name": name} for name, ps in groups]
    return torch.optim.AdamW(params, weight_decay=cfg.weight_decay, betas=(0.9, 0.999)), precision, est


def train(
    model: LlavaLite,
    examples: Sequence[Example],
    collator: Collator,
    cfg: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    accelerator=None,
    progress: bool = True,
) -> dict:
    """Train ``model`` on ``examples``; returns a summary (steps, last loss, seconds, padding share)."""
    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    torch.set_flush_denormal(True)
    accelerator = accelerator or make_accelerator(cfg.precision)
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(
            f"batch_size {cfg.batch_size} must divide by processes x grad_accum = {world} x {cfg.grad_accum}"
        )
    optimizer, precision, est = _optimizer(model, examples, cfg, accelerator)
    lengths = [len(e.enc) for e in examples]
    label_counts = [sum(label != IGNORE for label in e.enc.labels[1:]) for e in examples]
    per_epoch = len(plan_batches(lengths, cfg.batch_size, 0, cfg.seed))
    if per_epoch == 0:
        raise ValueError(f"{len(examples)} examples are fewer than one batch of {cfg.batch_size}")
    total = cfg.max_steps or max(1, int(per_epoch * cfg.epochs))
    warmup = max(1, int(cfg.warmup_ratio * total))
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    start = _resume(out_dir, model, optimizer, total) if resume else 0
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)

    metrics_path = out_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not resume and metrics_path.exists():
            metrics_path.unlink()
    plans: dict[int, list[list[int]]] = {}
    hide = not progress or rank != 0
    bar = tqdm(range(start, total), initial=start, total=total, desc=f"stage {cfg.stage}", disable=hide)
    t0, seen, last = time.perf_counter(), 0, {}
    pad_batches: list[list[int]] = []
    model.train()
    for step in bar:
        epoch, k = divmod(step, per_epoch)
        if epoch not in plans:
            plans = {epoch: plan_batches(lengths, cfg.batch_size, epoch, cfg.seed, cfg.group_by_length)}
        global_batch = plans[epoch][k]
        pad_batches.append(global_batch)
        n_tokens = sum(label_counts[i] for i in global_batch)
        for g, lr in zip(optimizer.param_groups, base_lrs):
            g["lr"] = lr * lr_factor(step, total, warmup)
        micro = [global_batch[m :: cfg.grad_accum] for m in range(cfg.grad_accum)]
        step_loss = _accumulate(model, accelerator, collator, examples, micro, n_tokens, step, out_dir)
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_loss = accelerator.reduce(step_loss, reduction="sum") / max(1, n_tokens)
        seen += len(global_batch)
        done = step + 1
        if done % cfg.log_every == 0 or done == total or done == start + 1:
            dt = time.perf_counter() - t0
            lr = optimizer.param_groups[0]["lr"]
            last = {"step": done, "loss": round(step_loss.item(), 5), "lr": lr, "samples_per_s": round(seen / dt, 2),
                    "seconds": round(dt, 2)}  # fmt: skip
            bar.set_postfix(loss=f"{last['loss']:.4f}", sps=f"{last['samples_per_s']:.1f}")
            if accelerator.is_main_process:
                with jsonl.open_for_append(metrics_path) as f:
                    jsonl.append(f, last)
        if accelerator.is_main_process and ((cfg.save_every and done % cfg.save_every == 0) or done == total):
            save_checkpoint(out_dir, done, raw, optimizer, cfg, cfg.keep_checkpoints)
        accelerator.wait_for_everyone()
    summary = {"steps": total, "started_at": start, "seconds": round(time.perf_counter() - t0, 2), "last": last,
               "padding_share": round(padding_share(pad_batches, lengths), 4) if pad_batches else None,
               "trainable_parameters": raw.trainable_parameters(), "processes": world, "precision": precision,
               "memory_estimate_gib": round(est.total / 2**30, 3)}  # fmt: skip
    if accelerator.is_main_process:
        io.write_json(out_dir / "summary.json", summary, indent=2)
    return summary


def read_metrics(out_dir: str | Path) -> list[dict]:
    """The logged steps of a run (``metrics.jsonl``), oldest first."""
    return [rec for _, rec in jsonl.read_jsonl(Path(out_dir) / "metrics.jsonl")]
