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

import hashlib
import logging
import math
import random
import shutil
import signal
import threading
import time
import uuid
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
# how a run reports and how often it saves; a run resumes under other values of these
NOT_COMPARED = ("log_every", "save_every", "keep_checkpoints", "stop_at")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: the run saved a checkpoint at the step it had finished, then stopped."""


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    elif cuda is not None:
        log.info("the checkpoint's CUDA random state is not restored (no matching GPU here)")


def run_settings(cfg: TrainConfig, model: LlavaLite, examples: Sequence[Example]) -> dict:
    """What decides a run's numbers, flat: the stage's settings (but how it logs and saves), the
    model's config and a digest of the examples. A resume under other values is refused."""
    data = hashlib.sha1()
    for e in examples:
        data.update(f"{e.enc.sample_id}\t{e.image}\t{len(e.enc)}\t{sum(e.enc.input_ids)}\n".encode())
    settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_COMPARED}
    settings.update({f"model.{k}": v for k, v in asdict(model.config).items()})
    settings.update({"examples": len(examples), "examples_sha1": data.hexdigest()})
    return settings


def _differences(saved: dict, now: dict) -> list[str]:
    return [f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)]  # fmt: skip


def _sync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        io.fsync_path(p)
    io.fsync_path(folder)


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: LlavaLite,
    optimizer,
    cfg: TrainConfig,
    keep: int,
    run: str = "",
    settings: dict | None = None,
    scaler=None,
) -> Path:
    """``out_dir/checkpoint-<step>/``: trained weights (safetensors), model config, optimizer,
    loss scaler, RNG states, the step (the schedule's and the data's position) and the run's
    settings; ``latest.json`` then points at it.

    The folder is written under a temporary name of this process, flushed to disk and renamed
    into place; a folder of the same name (an earlier run's) is moved aside first and removed
    after, so ``latest.json`` never names a missing folder. Then this run's checkpoints beyond the
    newest ``keep`` are removed; another run's never are."""
    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / (io.temp_name(final, uuid.uuid4().hex[:8]) + ".tmp")
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    model.config.save(tmp)
    scale = scaler.state_dict() if scaler is not None else None
    state = {"step": step, "optimizer": optimizer.state_dict(), "rng": _rng_state(), "train_config": asdict(cfg),
             "scaler": scale, "run": run, "settings": settings}  # fmt: skip
    torch.save(state, tmp / "train_state.pt")
    io.write_json(tmp / "run.json", {"run": run, "step": step})
    _sync_tree(tmp)
    aside = None
    if final.exists():
        aside = out_dir / (io.temp_name(final, "old" + uuid.uuid4().hex[:8]) + ".tmp")
        final.rename(aside)
    tmp.rename(final)
    io.fsync_path(out_dir)
    if aside is not None:
        shutil.rmtree(aside)
    io.write_json(out_dir / "latest.json", {"run": run, "step": step, "path": final.name})
    mine = sorted((c for c in run_checkpoints(out_dir, run) if c != final), key=_step_of)
    for old in mine[: max(0, len(mine) + 1 - max(1, keep))]:
        shutil.rmtree(old)
    return final


def _step_of(ckpt: Path) -> int:
    return int(ckpt.name.split("-")[1])


def run_checkpoints(out_dir: Path, run: str) -> list[Path]:
    """The checkpoint folders of run ``run`` in ``out_dir`` (by the id each one records)."""
    found = []
    for c in Path(out_dir).glob("checkpoint-*"):
        meta = c / "run.json"
        if c.is_dir() and meta.is_file() and io.read_json(meta).get("run") == run:
            found.append(c)
    return found


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The folder ``latest.json`` names: the newest checkpoint of the run last started here (None
    when that run has none yet)."""
    pointer = Path(out_dir) / "latest.json"
    if not pointer.exists():
        return None
    path = io.read_json(pointer).get("path")
    return Path(out_dir) / path if path else None


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


def _resume(out_dir: Path, model: LlavaLite, optimizer, settings: dict) -> tuple[int, str, dict | None]:
    """Weights and optimizer state from the latest checkpoint of the run last started in
    ``out_dir``; returns ``(step, run id, the rest of the saved state)``, ``(0, a new id, None)``
    when there is nothing to resume. The tensors load onto the CPU first, so a GPU run resumes on a
    CPU and back. A checkpoint made under other settings is refused, naming each one."""
    pointer = out_dir / "latest.json"
    if not pointer.exists():
        log.info("%s: nothing to resume, starting a new run", out_dir)
        return 0, uuid.uuid4().hex[:12], None
    run = io.read_json(pointer).get("run") or uuid.uuid4().hex[:12]
    ckpt = latest_checkpoint(out_dir)
    if ckpt is None:
        log.info("%s: run %s stopped before its first checkpoint; starting it from step 0", out_dir, run)
        return 0, run, None
    state = torch.load(ckpt / "train_state.pt", weights_only=False, map_location="cpu")
    if not state.get("settings"):
        raise ValueError(
            f"{ckpt}: written without its run's settings (an older version); start a new run without resume"
        )
    differ = _differences(state["settings"], settings)
    if differ:
        raise ValueError(
            f"{ckpt}: made with other settings ({'; '.join(differ)}); resume with the same settings, "
            "or start a new run without resume"
        )
    load_trained(model, ckpt)
    optimizer.load_state_dict(state["optimizer"])
    log.info("resuming run %s from %s (step %d)", run, ckpt, state["step"])
    return state["step"], run, state


class _CtrlC:
    """The first Ctrl-C asks the loop to stop after the step it is in (it saves a checkpoint
    first); a second one stops at once. Only the main thread can take signals: elsewhere it is off."""

    def __init__(self):
        self.asked, self._old = False, None

    def _handler(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        log.warning("Ctrl-C: stopping after this step with a checkpoint (press it again to stop at once)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


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
    """Train ``model`` on ``examples``; returns a summary (steps, last loss, seconds, padding share).

    ``resume``: go on from the latest checkpoint in ``out_dir`` of the run last started there,
    exactly as if it had never stopped; without it a new run starts (an earlier run's checkpoints
    stay until this one writes one of the same step). Ctrl-C saves a checkpoint and raises
    :class:`TrainingInterrupted`."""
    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    torch.set_flush_denormal(True)
    accelerator = accelerator or make_accelerator(cfg.precision)
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(
            f"batch_size {cfg.batch_size} must divide by processes x grad_accum = {world} x {cfg.grad_accum}"
        )
    lengths = [len(e.enc) for e in examples]
    per_epoch = len(plan_batches(lengths, cfg.batch_size, 0, cfg.seed))
    if per_epoch == 0:
        raise ValueError(f"{len(examples)} examples are fewer than one batch of {cfg.batch_size}")
    if hasattr(collator, "check_vision_key"):
        collator.check_vision_key(model.config.vision_key)
    optimizer, precision, est = _optimizer(model, examples, cfg, accelerator)
    label_counts = [sum(label != IGNORE for label in e.enc.labels[1:]) for e in examples]
    total = cfg.max_steps or max(1, int(per_epoch * cfg.epochs))
    warmup = max(1, int(cfg.warmup_ratio * total))
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    settings = run_settings(cfg, model, examples)
    if resume:
        start, run, state = _resume(out_dir, model, optimizer, settings)
    else:
        start, run, state = 0, uuid.uuid4().hex[:12], None
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    if state is not None and state.get("scaler") is not None:
        if accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
        else:
            log.info("the checkpoint's fp16 loss scale is not used: this run does not scale its loss")

    metrics_path = out_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        io.remove_stale_temps_in(out_dir)  # a killed run's half-written checkpoint or pointer
        if start == 0:
            others = [c.name for c in out_dir.glob("checkpoint-*") if c.is_dir()]
            if others and not resume:
                log.warning("%s: a new run; the earlier run's %s stay until replaced", out_dir, ", ".join(others))
            io.write_json(out_dir / "latest.json", {"run": run, "step": 0, "path": None})
        kept = [rec for _, rec in jsonl.read_jsonl(metrics_path) if rec.get("step", 0) <= start]
        if kept or metrics_path.exists():
            jsonl.write_jsonl(metrics_path, kept)  # the steps the checkpoint covers, nothing after
    accelerator.wait_for_everyone()
    if state is not None:
        _set_rng_state(state["rng"])
    plans: dict[int, list[list[int]]] = {}
    hide = not progress or rank != 0
    bar = tqdm(range(start, total), initial=start, total=total, desc=f"stage {cfg.stage}", disable=hide)
    t0, seen, last, done = time.perf_counter(), 0, {}, start
    pad_batches: list[list[int]] = []
    scaler = accelerator.scaler

    def save(done: int) -> Path | None:
        if accelerator.is_main_process:
            return save_checkpoint(out_dir, done, raw, optimizer, cfg, cfg.keep_checkpoints, run, settings, scaler)
        return None

    model.train()
    with _CtrlC() as ctrl_c:
        for step in bar:
            if cfg.stop_at and step >= cfg.stop_at:  # paused there (stop_at); the same run started again goes on
                log.info("stopped after step %d of %d (stop_at); start the same run again to go on", step, total)
                break
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
            if done % cfg.log_every == 0 or done in (total, start + 1, cfg.stop_at):
                dt = time.perf_counter() - t0
                lr = optimizer.param_groups[0]["lr"]
                last = {"step": done, "loss": round(step_loss.item(), 5), "lr": lr,
                        "samples_per_s": round(seen / dt, 2), "seconds": round(dt, 2)}  # fmt: skip
                bar.set_postfix(loss=f"{last['loss']:.4f}", sps=f"{last['samples_per_s']:.1f}")
                if accelerator.is_main_process:
                    with jsonl.open_for_append(metrics_path) as f:
                        jsonl.append(f, last)
            stop = ctrl_c.asked
            if world > 1:  # every process stops at the same step
                stop = bool(accelerator.reduce(torch.tensor(float(stop), device=accelerator.device), "sum").item())
            if (cfg.save_every and done % cfg.save_every == 0) or done in (total, cfg.stop_at) or stop:
                ckpt = save(done)
            accelerator.wait_for_everyone()
            if stop and done < total:
                bar.close()
                raise TrainingInterrupted(
                    f"stopped by Ctrl-C after step {done} of {total}; checkpoint {ckpt or out_dir}; "
                    "run again with resume to go on"
                )
    summary = {"steps": total, "started_at": start, "stopped_at": done if done < total else None,
               "seconds": round(time.perf_counter() - t0, 2), "last": last,
               "padding_share": round(padding_share(pad_batches, lengths), 4) if pad_batches else None,
               "trainable_parameters": raw.trainable_parameters(), "processes": world, "precision": precision,
               "memory_estimate_gib": round(est.total / 2**30, 3), "run": run}  # fmt: skip
    if accelerator.is_main_process:
        io.write_json(out_dir / "summary.json", summary, indent=2)
    return summary


def read_metrics(out_dir: str | Path) -> list[dict]:
    """The logged steps of a run (``metrics.jsonl``), oldest first."""
    return [rec for _, rec in jsonl.read_jsonl(Path(out_dir) / "metrics.jsonl")]
