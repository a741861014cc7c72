"""GPU check of the ``colab`` architecture at real sizes, random weights, nothing downloaded.

    python benchmarks/gpu_check.py            # on a CUDA GPU: under 5 minutes on an H100
    python benchmarks/gpu_check.py --small    # the same code path at toy sizes, on any machine

Builds an open_clip ViT-B-16 tower (224 px, 196 patch tokens, layer -2) and a ~0.5B
Qwen2-shaped language model from a config, joins them with the mlp2x_gelu projector, and runs
stage-2 training steps through the project's own loop pieces: full fine-tuning and LoRA, in bf16
and fp16 (autocast; fp16 with loss scaling). For each it prints peak memory, tokens/s and
model-FLOPs utilisation (6 x trainable-path FLOPs per token / peak), and whether the ``colab``
preset's micro-batch fits in 15 GB (a T4 has 15 GB usable).
"""

import argparse
import time

import torch

from llava_lite.config import LlavaConfig, get_preset
from llava_lite.model import LlavaLite, apply_lora
from llava_lite.train import set_trainable
from llava_lite.vision import VisionTower

PEAK_TFLOPS = {
    "H100": {"bf16": 989, "fp16": 989},
    "H200": {"bf16": 989, "fp16": 989},
    "A100": {"bf16": 312, "fp16": 312},
    "T4": {"bf16": 65, "fp16": 65},
}


def qwen_like(small: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if small:
        cfg = Qwen2Config(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
        )
    else:  # Qwen2.5-0.5B's shape
        cfg = Qwen2Config(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
        )
    return Qwen2ForCausalLM(cfg)


def tower(small: bool) -> VisionTower:
    if small:
        return VisionTower.from_config(
            {
                "embed_dim": 32,
                "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
                "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 1, "layers": 1},
            }
        )
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return VisionTower(
        open_clip.create_model("ViT-B-16").visual,
        name="ViT-B-16",
        weights_id="random-init",
        mean=OPENAI_DATASET_MEAN,
        std=OPENAI_DATASET_STD,
    )


def peak_tflops(precision: str) -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    for key, table in PEAK_TFLOPS.items():
        if key in name:
            return table[precision]
    return None


def run(mode: str, precision: str, micro: int, text_tokens: int, steps: int, small: bool, device: str) -> dict:
    torch.manual_seed(0)
    vt = tower(small).to(device)
    lm = qwen_like(small).to(device)
    n_img = vt.num_patches
    image_id = lm.config.vocab_size - 1
    cfg = LlavaConfig(
        vision_key=vt.cache_key,
        vision_dim=vt.width,
        num_image_tokens=n_img,
        lm_name="qwen2-0.5b-shape",
        lm_dim=lm.config.hidden_size,
        projector_type="mlp2x_gelu",
        image_token_id=image_id,
    )
    model = LlavaLite(cfg, lm, vision=vt).to(device)
    if mode == "lora":
        apply_lora(model, r=64, alpha=128)
    set_trainable(model, 2)
    model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode == "lora":
        model.lm.enable_input_require_grads()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler(device, enabled=precision == "fp16")
    ids = torch.cat([torch.full((micro, n_img), image_id), torch.randint(0, image_id, (micro, text_tokens))], 1).to(
        device
    )
    labels = ids.clone()
    labels[:, :n_img] = -100
    pixels = torch.randn(micro, 3, vt.image_size, vt.image_size, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    times = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autocast(device_type=device, dtype=dtype):
            loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step warms up
            times.append(time.perf_counter() - t0)
    dt = sum(times) / len(times)
    tokens = micro * ids.shape[1]
    lm_params = sum(p.numel() for p in model.lm.parameters())
    flops = (
        6 * lm_params * tokens + 2 * sum(p.numel() for p in vt.parameters()) * micro * n_img
    )  # LM fwd+bwd, tower fwd
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    tf = peak_tflops(precision)
    return {
        "mode": mode,
        "precision": precision,
        "micro_batch": micro,
        "tokens/step": tokens,
        "s/step": round(dt, 3),
        "tokens/s": round(tokens / dt),
        "peak GiB": round(peak, 2),
        "trainable": model.trainable_parameters(),
        "MFU": round(flops / dt / (tf * 1e12), 3) if tf else None,
        "fits 15 GB": peak < 15 if device == "cuda" else None,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="toy sizes (any machine)")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    colab = get_preset("colab")
    micro = colab.stage2.batch_size // colab.stage2.grad_accum
    text = colab.model.max_len - 196
    if args.small:
        text = 32
    print(
        f"device: {torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu'}; colab micro-batch {micro}, "
        f"{text} text tokens + image tokens per sample"
    )
    for mode in ("full", "lora"):
        for precision in ("bf16", "fp16"):
            if device == "cpu" and precision == "fp16":
                continue  # CPU autocast has no fp16 loss scaling path worth timing
            print(run(mode, precision, micro, text, args.steps, args.small, device), flush=True)


if __name__ == "__main__":
    main()
