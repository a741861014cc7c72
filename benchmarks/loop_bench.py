"""The training loop's stage-2 step against the pure step on the very same batches, in one run.

    python benchmarks/loop_bench.py [--steps 60] [--train-scenes 1500] [--profile]

The pure step is a forward, a backward and an AdamW step on batches collated beforehand (the same
model call as the loop's: right-padded, causal, no attention mask); the
loop's step is :func:`llava_lite.train.train` on the same examples, the same batch plan and the
same settings (the ``tiny`` preset's stage 2: batch 16, projector + whole LM trained, fp32). Both
start from the same weights; the first ``--skip`` steps of each are left out of the timing
(allocation warm-up). It prints ms/step for both, their ratio (goal: the loop within 1.10x of
the pure step), the model FLOPs per step and the utilisation of each against the fp32
matrix-product peak measured in the same run, and with ``--profile`` where a loop step's time
goes (cProfile, the loop's own functions and the heaviest callees).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


def gemm_peak(n: int = 1024, repeats: int = 7) -> float:
    """fp32 matrix-product FLOP/s of this CPU (best of ``repeats``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def model_flops(model, batch: dict) -> float:
    """Training FLOPs of one step: 6 x trained-path parameters x tokens for the matrix products of
    the language model and projector, plus attention's score and value products (x3 for backward)."""
    cfg = model.lm.config
    tokens = int(batch["attention_mask"].sum())
    B, T = batch["input_ids"].shape
    lm_params = sum(p.numel() for n, p in model.lm.named_parameters() if "embed_tokens" not in n)
    lm_params += cfg.vocab_size * cfg.hidden_size  # the output projection (tied to the embeddings)
    proj = sum(p.numel() for p in model.projector.parameters())
    n_img = model.config.num_image_tokens * batch["image_features"].shape[0] if "image_features" in batch else 0
    attention = 2 * 2 * B * T * T * cfg.hidden_size * cfg.num_hidden_layers  # QK^T and AV, forward
    return 6 * lm_params * tokens + 6 * proj * n_img + 3 * attention


def trainer_step_ms(model, examples, collate, cfg, steps: int, skip: int) -> float:
    """``transformers.Trainer`` on the same model, examples, collator, batch size, learning rate,
    schedule shape and step count (its own sampler and one AdamW group): median ms a step."""
    from accelerate.state import AcceleratorState
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Clock(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    AcceleratorState._reset_state(True)  # one accelerate state a process: the Trainer makes its own
    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        warmup = max(1, int(cfg.warmup_ratio * steps))
        targs = TrainingArguments(out, per_device_train_batch_size=cfg.batch_size, max_steps=steps,
                                  learning_rate=cfg.lr, lr_scheduler_type="cosine", warmup_steps=warmup,
                                  weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, logging_steps=10,
                                  save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                                  remove_unused_columns=False, seed=cfg.seed, disable_tqdm=True)  # fmt: skip
        Trainer(model=model, args=targs, train_dataset=examples, data_collator=collate, callbacks=[clock]).train()
    gaps = [b - a for a, b in zip(clock.times[skip - 1 :], clock.times[skip:])]
    return statistics.median(gaps) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip", type=int, default=10, help="first steps of each left out of the timing")
    ap.add_argument("--train-scenes", type=int, default=1500)
    ap.add_argument("--profile", action="store_true", help="also profile the loop's steps (cProfile)")
    ap.add_argument("--outputs", help="outputs folder to build the world and features in (default: a temp dir)")
    ap.add_argument("--peer", action="store_true", help="also time transformers.Trainer on the same examples")
    args = ap.parse_args()
    os.environ.setdefault("LLAVA_LITE_OUTPUTS", args.outputs or tempfile.mkdtemp(prefix="loop-bench-"))

    from llava_lite import lesson, stages
    from llava_lite.data import Collator, plan_batches
    from llava_lite.model import token_loss
    from llava_lite.train import make_accelerator, set_trainable, train

    torch.set_flush_denormal(True)
    splits = {"pretrain": 0, "train": args.train_scenes, "val": 8, "test": 8}
    setup = lesson.setup("tiny", splits, instruct_splits=("train",), feature_splits=("train",), model=True)
    cfg = replace(setup.cfg.stage2, max_steps=args.steps, log_every=1, save_every=0)
    samples = stages.stage_samples(setup.layout, "train", 2)
    _, examples, _ = stages.stage_examples(setup.cfg, setup.tokenizer, samples, 2, setup.model.config.num_image_tokens)
    collate = Collator(setup.tokenizer.pad_token_id, features=setup.features["train"])
    lengths = [len(e.enc) for e in examples]
    plan = plan_batches(lengths, cfg.batch_size, 0, cfg.seed, cfg.group_by_length)[: args.steps]
    batches = [collate([examples[i] for i in idx]) for idx in plan]
    start = {k: v.clone() for k, v in setup.model.state_dict().items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(examples)} stage-2 examples, "
          f"batch {cfg.batch_size}, {args.steps} steps ({args.skip} left out of the timing)")  # fmt: skip

    # the pure step: forward, backward, AdamW, nothing else
    model = setup.model
    groups = set_trainable(model, 2)
    lrs = {"projector": cfg.lr, "lm": cfg.lm_lr or cfg.lr}

    def pure_steps(masked: bool = False) -> list[float]:
        model.load_state_dict(start)
        opt = torch.optim.AdamW([{"params": ps, "lr": lrs[n]} for n, ps in groups], weight_decay=cfg.weight_decay)
        model.train()
        times = []
        for b in batches:
            t0 = time.perf_counter()
            mask = b["attention_mask"] if masked else None  # right-padded: causal attention needs no mask
            out = model(input_ids=b["input_ids"], attention_mask=mask, image_features=b["image_features"])
            token_loss(out.logits, b["labels"]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        return times

    pure = pure_steps()

    # the loop's step, from the same weights, on the same batch plan
    model.load_state_dict(start)
    with tempfile.TemporaryDirectory() as run:
        profiler = cProfile.Profile() if args.profile else None
        if profiler:
            profiler.enable()
        train(model, examples, collate, cfg, Path(run), accelerator=make_accelerator(cfg.precision), progress=False)
        if profiler:
            profiler.disable()
        log = [r for r in (Path(run) / "metrics.jsonl").read_text().splitlines() if r]
    pure_after = pure_steps()  # once more after the loop: the order of the two runs changes nothing
    masked = pure_steps(masked=True)
    seconds = [json.loads(r)["seconds"] for r in log]
    loop = [b - a for a, b in zip(seconds[args.skip - 1 :], seconds[args.skip :])]
    pure_ms, loop_ms = (
        statistics.median(pure[args.skip :] + pure_after[args.skip :]) * 1e3,
        statistics.median(loop) * 1e3,
    )
    print(f"pure step before the loop {statistics.median(pure[args.skip:]) * 1e3:.1f} ms, "
          f"after it {statistics.median(pure_after[args.skip:]) * 1e3:.1f} ms")  # fmt: skip
    peak = gemm_peak()
    flops = statistics.mean(model_flops(model, b) for b in batches)
    print(f"pure step  : {pure_ms:7.1f} ms   {flops / (pure_ms / 1e3) / 1e9:6.1f} GFLOP/s   "
          f"MFU {flops / (pure_ms / 1e3) / peak:.1%}")  # fmt: skip
    print(f"loop step  : {loop_ms:7.1f} ms   {flops / (loop_ms / 1e3) / 1e9:6.1f} GFLOP/s   "
          f"MFU {flops / (loop_ms / 1e3) / peak:.1%}")  # fmt: skip
    masked_ms = statistics.median(masked[args.skip :]) * 1e3
    print(f"pure step with the attention mask passed: {masked_ms:7.1f} ms ({masked_ms / pure_ms:.2f}x the unmasked)")
    print(f"loop / pure: {loop_ms / pure_ms:.2f}x (goal <= 1.10x); fp32 matrix-product peak {peak / 1e9:.0f} GFLOP/s; "
          f"{flops / 1e9:.2f} GFLOP a step")  # fmt: skip
    if args.peer:
        model.load_state_dict(start)
        peer_ms = trainer_step_ms(model, examples, collate, cfg, args.steps, args.skip)
        print(f"transformers.Trainer step: {peer_ms:7.1f} ms; Trainer / our loop: {peer_ms / loop_ms:.2f}x (goal >= 1)")
    if profiler:
        stats = pstats.Stats(profiler)
        stats.sort_stats("cumulative").print_stats(r"llava_lite|accelerate|clip_grad|optim|backward|collat", 25)


if __name__ == "__main__":
    main()
