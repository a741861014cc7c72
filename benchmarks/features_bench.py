"""Feature cache: extraction speed, and what the cache saves a stage-1 step, measured side by side.

    python benchmarks/features_bench.py [--images 512] [--batch 32] [--repeats 5] [--encoder tiny-clip]

1. Extraction: ``features.extract`` over a freshly generated world split (PNG decode,
   preprocessing, the frozen tower, fp16 shards) -> images/s.
2. A stage-1-sized step (batch of images, each 64 image tokens + text, projector trainable,
   forward + backward through a tiny Llama): image features read from the cache vs. computed
   from the image files through the tower, in the same run -> ms/step and their ratio.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llava_lite import world
from llava_lite.config import LlavaConfig, WorldConfig
from llava_lite.features import FeatureReader, cache_folder, extract, split_images
from llava_lite.model import LlavaLite
from llava_lite.vision import VisionTower

LM = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
)


def timed_side_by_side(steps: dict, repeats: int) -> dict:
    """Median ms of each step, run in turns (a, b, a, b, ...) so both see the same machine load."""
    for step in steps.values():
        step()  # warm-up
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--text", type=int, default=24, help="text tokens per sample besides the image tokens")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--encoder", default="tiny-clip")
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    tower = VisionTower.load(args.encoder)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        world.generate(
            WorldConfig(image_size=tower.image_size, splits={"bench": args.images}, seed=7),
            tmp / "world",
            progress=False,
        )
        inst, image_dir = tmp / "world" / "annotations" / "instances_bench.json", tmp / "world" / "bench"
        t0 = time.perf_counter()
        folder = extract(
            tower, inst, image_dir, cache_folder(tmp / "features", tower, "bench"), batch_size=64, progress=False
        )
        t_extract = time.perf_counter() - t0
        reader = FeatureReader(folder)
        recs = split_images(inst)[: args.batch]

        image_id = LM["vocab_size"] - 1
        P = tower.num_patches
        cfg = LlavaConfig(
            vision_key=tower.cache_key,
            vision_dim=tower.width,
            num_image_tokens=P,
            lm_name="bench",
            lm_dim=LM["hidden_size"],
            projector_type="mlp2x_gelu",
            image_token_id=image_id,
        )
        model = LlavaLite(cfg, LlamaForCausalLM(LlamaConfig(**LM)), vision=tower)
        model.requires_grad_(False)
        model.projector.requires_grad_(True)
        B = len(recs)
        ids = torch.cat([torch.full((B, P), image_id), torch.randint(0, image_id, (B, args.text))], 1)  # [B, P + T]
        labels = ids.clone()
        labels[:, :P] = -100

        def from_cache(backward: bool):
            feats = reader.get_many([r.image_id for r in recs]).float()  # [B, P, Dv]
            loss = model(input_ids=ids, image_features=feats, labels=labels).loss
            if backward:
                loss.backward()

        def from_pixels(backward: bool):
            pixels = tower.pixels([image_dir / r.file_name for r in recs])  # [B, 3, S, S]
            loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
            if backward:
                loss.backward()

        fwd = timed_side_by_side(
            {"pixels": lambda: from_pixels(False), "cache": lambda: from_cache(False)}, args.repeats
        )
        step = timed_side_by_side(
            {"pixels": lambda: from_pixels(True), "cache": lambda: from_cache(True)}, args.repeats
        )

    print(f"tower {tower.cache_key}: {P} tokens x {tower.width}, torch threads {torch.get_num_threads()}")
    print(f"feature extraction: {args.images} images in {t_extract:.1f} s = {args.images / t_extract:.0f} images/s")
    for what, t in (("forward", fwd), ("forward + backward", step)):
        print(f"stage-1-sized {what} (batch {B}, {P} image + {args.text} text tokens, median of {args.repeats}):")
        print(f"  from image files through the tower: {t['pixels']:8.1f} ms")
        print(
            f"  from the feature cache            : {t['cache']:8.1f} ms   "
            f"ratio pixels/cache {t['pixels'] / t['cache']:.2f}"
        )


if __name__ == "__main__":
    main()
