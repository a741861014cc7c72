"""A tiny LLaVA built in a second, for the tests of the model, the templates and the loop.

It reads text with the shipped tiny LM's tokenizer (``data/pretrained/tiny-lm``: byte-level BPE,
512 tokens, the role tokens and their chat template) over a small random Llama; no lab code."""

import random

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llava_lite import world
from llava_lite.coco import SymbolicContext
from llava_lite.config import LlavaConfig, WorldConfig
from llava_lite.model import LlavaLite, add_image_token
from llava_lite.paths import PRETRAINED_DIR
from llava_lite.teachers import symbolic

NUM_IMAGE_TOKENS = 4
VISION_DIM = 12


def world_samples(n: int = 40, kinds=("caption", "conversation", "exact"), seed: int = 0):
    scenes = world.sample_world(WorldConfig(splits={"train": n}, seed=seed))["train"]
    contexts = [
        SymbolicContext(
            s.image_id, s.file_name, s.size, s.size, world.captions(s, random.Random(s.image_id)), s.objects()
        )
        for s in scenes
    ]
    samples, _ = symbolic.generate(contexts, kinds)
    return contexts, samples


def tiny_tokenizer():
    """A fresh copy of the shipped tiny LM's tokenizer (tests may add tokens to theirs)."""
    return AutoTokenizer.from_pretrained(PRETRAINED_DIR / "tiny-lm")


def tiny_llava(tokenizer, projector_type="mlp2x_gelu", seed=0) -> LlavaLite:
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    image_id = add_image_token(tokenizer, lm)
    cfg = LlavaConfig(
        vision_key="test-features",
        vision_dim=VISION_DIM,
        num_image_tokens=NUM_IMAGE_TOKENS,
        lm_name="tiny-random",
        lm_dim=32,
        projector_type=projector_type,
        image_token_id=image_id,
    )
    return LlavaLite(cfg, lm)


def fake_features(name: str) -> torch.Tensor:
    """Deterministic per-image stand-in features for loop tests (the vision tests use real towers)."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.randn(NUM_IMAGE_TOKENS, VISION_DIM, generator=g)
