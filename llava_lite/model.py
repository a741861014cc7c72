"""The LLaVA model: vision tower (or cached features) -> projector -> image tokens spliced into
the language model's input embeddings where ``<image>`` stands -> causal-LM loss.

A sample's single ``<image>`` placeholder is expanded to one placeholder per patch token before
the model sees it (:func:`llava_lite.conversation.expand_image`), so splicing is one
``masked_scatter``: the k-th placeholder in the batch receives the k-th projected patch.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .config import LlavaConfig
from .conversation import IGNORE, IMAGE_TOKEN

log = logging.getLogger(__name__)
PROJECTOR_TYPES = ("linear", "mlp2x_gelu")


class Projector(nn.Module):
    """Vision width -> LM hidden size. ``linear`` is the paper's; ``mlp2x_gelu`` is LLaVA-1.5's
    (named ``linear_1``/``linear_2`` as in Hugging Face's Llava, so export is a rename-free copy)."""

    def __init__(self, vision_dim: int, lm_dim: int, kind: str = "mlp2x_gelu"):
        super().__init__()
        if kind not in PROJECTOR_TYPES:
            raise ValueError(f"unknown projector type {kind!r}; expected one of {PROJECTOR_TYPES}")
        self.kind = kind
        self.linear_1 = nn.Linear(vision_dim, lm_dim)
        if kind == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(lm_dim, lm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, P, Dv] -> [N, P, D]
        x = self.linear_1(x)
        if self.kind == "mlp2x_gelu":
            x = self.linear_2(self.act(x))
        return x


def add_image_token(tokenizer, lm) -> int:
    """Make ``<image>`` one special token of ``tokenizer`` (growing ``lm``'s embeddings if new)."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        lm.resize_token_embeddings(len(tokenizer))
        log.info("added %s to the tokenizer (id %d)", IMAGE_TOKEN, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


class LlavaLite(nn.Module):
    def __init__(self, config: LlavaConfig, lm: nn.Module, vision: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.lm = lm
        self.vision = vision  # frozen; None when training from the feature cache
        self.projector = Projector(config.vision_dim, config.lm_dim, config.projector_type)
        if vision is not None:
            vision.requires_grad_(False).eval()

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    def image_features(self, image_features: torch.Tensor | None, pixel_values: torch.Tensor | None) -> torch.Tensor:
        if image_features is None:
            if pixel_values is None:
                raise ValueError("the batch has <image> tokens but neither image_features nor pixel_values")
            if self.vision is None:
                raise ValueError(
                    "pixel_values given but this model has no vision tower (it was built for cached features)"
                )
            with torch.no_grad():
                image_features = self.vision(pixel_values)  # [N, 3, H, W] -> [N, P, Dv]
        return image_features

    def embed(
        self,
        input_ids: torch.Tensor,
        image_features: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        sample_ids: list[str] | None = None,
    ) -> torch.Tensor:
        """Input embeddings with projected image patches in the ``<image>`` slots: ``[B, T, D]``."""
        embeds = self.lm.get_input_embeddings()(input_ids)  # [B, T] -> [B, T, D]
        slots = input_ids == self.image_token_id  # [B, T]
        n_slots = int(slots.sum())
        have = image_features is not None or pixel_values is not None
        if n_slots == 0 and not have:
            return embeds  # a text-only batch
        feats = self.image_features(image_features, pixel_values)  # [N, P, Dv]
        n_feats = feats.shape[0] * feats.shape[1]
        if n_slots != n_feats:
            per_sample = slots.sum(1).tolist()
            raise ValueError(
                f"image placeholders and image features disagree: the batch has {n_slots} <image> slots "
                f"(per sample {per_sample}{', ids ' + str(sample_ids) if sample_ids else ''}) but "
                f"{feats.shape[0]} image(s) x {feats.shape[1]} patch tokens = {n_feats} features"
            )
        proj = self.projector(feats.to(self.projector.linear_1.weight.dtype))  # [N, P, Dv] -> [N, P, D]
        return embeds.masked_scatter(slots.unsqueeze(-1), proj.to(embeds.dtype))

    def forward(
        self,
        input_ids,
        attention_mask=None,
        labels=None,
        image_features=None,
        pixel_values=None,
        sample_ids=None,
        **lm_kwargs,
    ):
        embeds = self.embed(input_ids, image_features, pixel_values, sample_ids)
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **lm_kwargs)

    @torch.no_grad()
    def generate(
        self, input_ids, attention_mask=None, image_features=None, pixel_values=None, max_new_tokens: int = 32, **kwargs
    ) -> torch.Tensor:
        """Greedy continuation (KV cache on) of left-padded prompts; returns the new tokens ``[B, T_new]``."""
        embeds = self.embed(input_ids, image_features, pixel_values)
        kwargs.setdefault("do_sample", False)
        return self.lm.generate(
            inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens, use_cache=True, **kwargs
        )

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def token_loss(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean", weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token cross-entropy: position ``t`` predicts ``labels[t + 1]``; labels of -100 are not
    learned. ``reduction``: ``"mean"`` over the learned tokens or ``"sum"``. With ``weights``
    (``[B, T]``, one per target token, 0 = not learned) every token counts, weighted, and the
    result is the weighted mean. Logits ``[B, T, V]`` are scored in fp32."""
    logits = logits[:, :-1].float()  # [B, T-1, V]
    target = labels[:, 1:].reshape(-1)  # [B*(T-1)]
    flat = logits.reshape(-1, logits.shape[-1])  # [B*(T-1), V]
    if weights is None:
        return F.cross_entropy(flat, target, ignore_index=IGNORE, reduction=reduction)
    w = weights[:, 1:].reshape(-1)
    return (F.cross_entropy(flat, target, reduction="none") * w).sum() / w.sum().clamp_min(1e-8)


# ------------------------------------------------------------------ LoRA
def apply_lora(
    model: LlavaLite, r: int = 16, alpha: int = 32, dropout: float = 0.0, target_modules: str | list[str] = "all-linear"
) -> LlavaLite:
    """Wrap the language model's linear layers with LoRA adapters (peft). The projector stays a
    full module that trains and is saved with the adapters, so a checkpoint never loses it."""
    from peft import LoraConfig, get_peft_model  # peft takes seconds to import, and only LoRA needs it

    cfg = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none", task_type="CAUSAL_LM"
    )
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing alias
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model.lm = get_peft_model(model.lm, cfg)
    return model


def merge_lora(model: LlavaLite) -> LlavaLite:
    """Fold the adapters into the base weights: one call, an ordinary model afterwards."""
    if not hasattr(model.lm, "merge_and_unload"):
        raise ValueError("this model has no LoRA adapters to merge")
    model.lm = model.lm.merge_and_unload()
    return model
