"""One stage-1 training step (forward + backward, projector trainable) of our LLaVA against
transformers' LlavaForConditionalGeneration at the same tiny sizes and batch, in one run.

    python benchmarks/model_step_bench.py [--batch 32] [--repeats 10] [--tower tiny|vit-b-16]

Prints ms/step for: transformers from pixels, ours from pixels, ours from cached features, and
the ratios (goal: ours no slower from pixels, at least 2x faster from cached features).

``--tower tiny`` (default) is the shipped tiny CLIP's shape; ``--tower vit-b-16`` puts a
ViT-B/16 at 224 px (the `colab` preset's tower, random weights) beside the same tiny language
model, the proportions of a real LLaVA, where the tower is a large share of a step.
"""

import argparse
import statistics
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaForConditionalGeneration
from transformers import LlavaConfig as HFLlavaConfig

from llava_lite.config import LlavaConfig
from llava_lite.model import LlavaLite
from llava_lite.vision import VisionTower

# towers: (image, patch, width, layers, heads); "tiny" is the shipped tiny CLIP's shape
TOWERS = {"tiny": (64, 8, 64, 4, 2), "vit-b-16": (224, 16, 768, 12, 12)}
# the shipped tiny language model's shape (data/pretrained/tiny-lm)
LM = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=1024,
)


def timed(step, repeats):
    step()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--text", type=int, default=24, help="text tokens per sample besides the image tokens")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--tower", choices=sorted(TOWERS), default="tiny")
    args = ap.parse_args()
    IMAGE, PATCH, V_WIDTH, V_LAYERS, V_HEADS = TOWERS[args.tower]
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    n_patches = (IMAGE // PATCH) ** 2
    image_id = LM["vocab_size"] - 1

    # transformers' Llava (CLIP vision tower, layer -2, CLS dropped, gelu MLP projector)
    hf_cfg = HFLlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=V_WIDTH,
            intermediate_size=4 * V_WIDTH,
            num_hidden_layers=V_LAYERS,
            num_attention_heads=V_HEADS,
            image_size=IMAGE,
            patch_size=PATCH,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
        ),
        text_config=LlamaConfig(**LM),
        image_token_index=image_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    hf = LlavaForConditionalGeneration(hf_cfg)
    hf.requires_grad_(False)
    hf.model.multi_modal_projector.requires_grad_(True)

    # ours: an open_clip ViT of the same shape, the same Llama, the same projector
    tower = VisionTower.from_config(
        {
            "embed_dim": V_WIDTH,
            "vision_cfg": {
                "image_size": IMAGE,
                "patch_size": PATCH,
                "width": V_WIDTH,
                "layers": V_LAYERS,
                "head_width": V_WIDTH // V_HEADS,
            },
            "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 64, "heads": 1, "layers": 1},
        }
    )
    cfg = LlavaConfig(
        vision_key=tower.cache_key,
        vision_dim=V_WIDTH,
        num_image_tokens=n_patches,
        lm_name="bench",
        lm_dim=LM["hidden_size"],
        projector_type="mlp2x_gelu",
        image_token_id=image_id,
    )
    ours = LlavaLite(cfg, LlamaForCausalLM(LlamaConfig(**LM)), vision=tower)
    ours.requires_grad_(False)
    ours.projector.requires_grad_(True)

    B = args.batch
    text = torch.randint(0, image_id, (B, args.text))
    ids = torch.cat([torch.full((B, n_patches), image_id), text], 1)  # [B, P + T]
    labels = ids.clone()
    labels[:, :n_patches] = -100
    pixels = torch.randn(B, 3, IMAGE, IMAGE)
    with torch.no_grad():
        feats = tower(pixels)  # [B, P, Dv]: what the feature cache holds

    def hf_step():
        hf(input_ids=ids, pixel_values=pixels, labels=labels).loss.backward()

    def ours_pixels():
        ours(input_ids=ids, pixel_values=pixels, labels=labels).loss.backward()

    def ours_cached():
        ours(input_ids=ids, image_features=feats, labels=labels).loss.backward()

    def tower_only():
        with torch.no_grad():
            tower(pixels)

    t_tower = timed(tower_only, args.repeats)
    t_hf = timed(hf_step, args.repeats)
    t_px = timed(ours_pixels, args.repeats)
    t_fc = timed(ours_cached, args.repeats)
    print(
        f"tower {args.tower} ({IMAGE} px, patch {PATCH}, width {V_WIDTH}, {V_LAYERS} layers), "
        f"batch {B}, {n_patches} image tokens + {args.text} text tokens, torch threads {torch.get_num_threads()}"
    )
    print(f"transformers Llava, from pixels : {t_hf:8.1f} ms/step")
    print(f"llava-lite, from pixels         : {t_px:8.1f} ms/step   ratio {t_hf / t_px:5.2f}x (goal >= 1.0)")
    print(f"llava-lite, from cached features: {t_fc:8.1f} ms/step   ratio {t_hf / t_fc:5.2f}x (goal >= 2.0)")
    share = t_tower / t_px
    print(
        f"the tower's forward alone       : {t_tower:8.1f} ms = {share:.0%} of our step from pixels, so skipping it "
        f"can save at most {1 / (1 - share):.2f}x at these sizes (Amdahl)"
    )


if __name__ == "__main__":
    main()
