"""fp32 against bf16 autocast for a stage-2 step on this CPU: speed, model-FLOPs utilisation, and
whether bf16 trains as well. Everything is measured side by side in one run.

    python benchmarks/precision_bench.py [--batch 16] [--repeats 8] [--train-steps 150]

1. The matrix-product peak of this CPU in fp32 and bf16 (a 2048^3 product, best of 5): the
   denominators of utilisation.
2. One stage-2 step (forward, backward, AdamW step; projector and the whole language model
   trained) of the ``tiny`` LLaVA at the tutorial's batch: the shipped tiny LM, 64 image tokens
   (the tiny CLIP's patch grid, from cached-feature-shaped inputs) + ``--text`` text tokens.
   Model FLOPs per step = 6 x parameters x tokens + attention (12 x layers x width x length^2
   per sequence); utilisation = model FLOPs/s over the fp32 peak (the issue's measure) and over
   the peak of the precision used.
3. With ``--train-steps N`` and the ``tiny`` preset's data in outputs/ (notebooks 00-03 or the
   ``llava-lite`` commands make it): N stage-2 steps from the same stage-1 checkpoint in each
   precision, and the held-out loss of each: "trains as well" measured, not assumed.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from llava_lite.config import LlavaConfig, get_preset
from llava_lite.model import LlavaLite, add_image_token
from llava_lite.stages import load_language
from llava_lite.train import set_trainable


def gemm_peak(dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_time(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_timing(precision: str, batch: int, text: int, repeats: int) -> dict:
    torch.manual_seed(0)
    preset = get_preset("tiny")
    lm, tok = load_language(preset.language)
    n_img, v_dim = 64, 64  # the tiny CLIP: 8 x 8 patches of width 64
    image_id = add_image_token(tok, lm)
    cfg = LlavaConfig(
        vision_key="bench",
        vision_dim=v_dim,
        num_image_tokens=n_img,
        lm_name="tiny-lm",
        lm_dim=lm.config.hidden_size,
        projector_type="mlp2x_gelu",
        image_token_id=image_id,
    )
    model = LlavaLite(cfg, lm)
    groups = set_trainable(model, 2)
    opt = torch.optim.AdamW([p for _, ps in groups for p in ps], lr=1e-4)
    words = torch.randint(len(tok.all_special_ids), len(tok), (batch, text))  # ordinary tokens (specials come first)
    ids = torch.cat([torch.full((batch, n_img), image_id), words], 1)  # [B, P + T]
    labels = ids.clone()
    labels[:, :n_img] = -100
    feats = torch.randn(batch, n_img, v_dim)  # [B, P, Dv]

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=ids, image_features=feats, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    ms = statistics.median(_time(step) for _ in range(repeats)) * 1000
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    c = lm.config
    length = n_img + text
    flops = 6 * n_params * batch * length + 12 * c.num_hidden_layers * c.hidden_size * length**2 * batch
    return {
        "ms": ms,
        "tokens_per_s": batch * length / ms * 1000,
        "flops_per_s": flops / ms * 1000,
        "params": n_params,
        "tokens": batch * length,
    }


def train_compare(steps: int) -> dict | None:
    """Stage 2 for ``steps`` steps from the latest stage-1 checkpoint, fp32 vs bf16: held-out loss."""
    from dataclasses import replace

    from llava_lite import stages
    from llava_lite.data import Collator
    from llava_lite.evaluate import mean_loss
    from llava_lite.paths import Layout
    from llava_lite.train import latest_checkpoint, make_accelerator

    preset = get_preset("tiny")
    layout = Layout.for_preset("tiny")
    stage1 = latest_checkpoint(stages.run_dir(layout, 1))
    if stage1 is None or not (layout.instruct / "val.json").exists():
        print(
            f"(no tiny stage-1 checkpoint or instruction data under {layout.root}: skipping the training comparison; "
            "run notebooks 00-03 first)"
        )
        return None
    tower = stages.load_vision(preset.vision)
    out = {}
    from accelerate.state import AcceleratorState

    for precision in ("fp32", "bf16"):
        AcceleratorState._reset_state(True)  # accelerate keeps one state per process; each run sets its own
        lm, tok = stages.load_language(preset.language)
        model = stages.build_llava(preset, lm, tok, tower)
        stages.prepare_stage2(preset, model, stage1, lora=False)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            stages.run_stage(
                replace(preset, stage2=replace(preset.stage2, precision=precision)),
                model,
                tok,
                stages.split_features(layout, "train", tower, progress=False),
                2,
                stages.stage_samples(layout, "train", 2),
                Path(tmp),
                accelerator=make_accelerator(precision),
                progress=False,
                max_steps=steps,
            )
        seconds = time.perf_counter() - t0
        _, val, _ = stages.stage_examples(
            preset, tok, stages.stage_samples(layout, "val", 2)[:400], 2, model.config.num_image_tokens
        )
        loss = mean_loss(
            model, val, Collator(tok.pad_token_id, features=stages.split_features(layout, "val", tower, progress=False))
        )
        out[precision] = {"seconds": seconds, "val_loss": loss}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16, help="the tiny preset's stage-2 batch")
    ap.add_argument("--text", type=int, default=48, help="text tokens per sample besides the 64 image tokens")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--train-steps", type=int, default=0)
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    peak = {"fp32": gemm_peak(torch.float32), "bf16": gemm_peak(torch.bfloat16)}
    print(
        f"torch threads {torch.get_num_threads()}; matrix-product peak: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, "
        f"bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s"
    )
    res = {p: step_timing(p, args.batch, args.text, args.repeats) for p in ("fp32", "bf16")}
    r = res["fp32"]
    print(
        f"stage-2 step, tiny LLaVA, batch {args.batch} x {64 + args.text} tokens, "
        f"{r['params'] / 1e6:.2f}M trained parameters"
    )
    for p, r in res.items():
        print(
            f"  {p}: {r['ms']:7.1f} ms/step  {r['tokens_per_s']:8.0f} tokens/s  {r['flops_per_s'] / 1e9:6.1f} GFLOP/s  "
            f"MFU {r['flops_per_s'] / peak['fp32']:.1%} of the fp32 peak, "
            f"{r['flops_per_s'] / peak[p]:.1%} of the {p} peak"
        )
    print(f"  bf16 autocast vs fp32: {res['fp32']['ms'] / res['bf16']['ms']:.2f}x the speed")
    if args.train_steps:
        cmp = train_compare(args.train_steps)
        if cmp:
            for p, c in cmp.items():
                print(
                    f"  {args.train_steps} stage-2 steps in {p}: {c['seconds']:.0f} s, "
                    f"held-out loss {c['val_loss']:.4f}"
                )


if __name__ == "__main__":
    main()
