"""The tutorial's stages put together for a preset: what the notebooks and ``llava-lite train`` /
``llava-lite evaluate`` call. Each function is a few lines over the modules that do the work.

    load_language / load_vision      the pretrained parts (shipped tiny ones, or hub/open_clip names)
    build_llava                      vision width -> projector -> LM, with <image> in the tokenizer
    features                         the feature cache of a split (extracted when missing)
    stage_examples                   LLaVA samples of a stage -> tokenised examples
    run_stage                        stage 1 or 2 through the one training loop
    load_stage                       a trained stage back from its checkpoint
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import io
from .config import LanguageConfig, Preset, VisionConfig
from .conversation import get_template
from .data import Collator, encode_samples
from .model import LlavaConfig, LlavaLite, add_image_token, apply_lora
from .paths import PRETRAINED_DIR, Layout

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STAGE_TYPES = {1: ("caption",), 2: ("conversation", "detail", "complex", "exact")}


def resolve(name: str) -> str:
    """A short name of ``data/pretrained/`` -> its folder; anything else unchanged (a folder or hub id)."""
    shipped = PRETRAINED_DIR / name
    return str(shipped) if shipped.is_dir() else name


def load_language(cfg: LanguageConfig):
    """``(lm, tokenizer)``: the shipped tiny LM, a local folder, or a hub model (the real path)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = resolve(cfg.name)
    tokenizer = AutoTokenizer.from_pretrained(where)
    lm = AutoModelForCausalLM.from_pretrained(where, dtype=DTYPES[cfg.dtype])
    return lm, tokenizer


def load_vision(cfg: VisionConfig):
    from .vision import VisionTower

    return VisionTower.load(cfg.encoder, cfg.pretrained, layer=cfg.layer, keep_cls=cfg.keep_cls)


def build_llava(preset: Preset, lm, tokenizer, tower, with_tower: bool = False) -> LlavaLite:
    """A fresh LLaVA (untrained projector) over ``lm`` and ``tower``'s features."""
    image_id = add_image_token(tokenizer, lm)
    cfg = LlavaConfig(vision_key=tower.cache_key, vision_dim=tower.width, num_image_tokens=tower.num_patches,
                      lm_name=preset.language.name, lm_dim=lm.config.hidden_size,
                      projector_type=preset.model.projector_type, image_token_id=image_id)
    return LlavaLite(cfg, lm, vision=tower if with_tower else None)


def features(layout: Layout, split: str, tower, progress: bool = True):
    """The feature cache of ``split`` for ``tower`` (extracted first when missing or unfinished)."""
    from . import features as fc

    folder = fc.cache_folder(layout.features, tower, split)
    fc.extract(tower, layout.instances(split), layout.images(split), folder, progress=progress)
    return fc.FeatureReader(folder, expect_key=tower.cache_key)


def stage_samples(layout: Layout, split: str, stage: int) -> list[dict]:
    path = layout.instruct / f"{split}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no instruction data yet (run notebook 01 or `llava-lite instruct`)")
    return [s for s in io.read_json(path) if s.get("type") in STAGE_TYPES[stage]]


def stage_examples(preset: Preset, tokenizer, samples: list[dict], stage: int, num_image_tokens: int):
    name = preset.model.stage1_template if stage == 1 else preset.model.stage2_template
    template = get_template(name, tokenizer)
    examples, stats = encode_samples(samples, template, num_image_tokens, preset.model.max_len)
    return template, examples, stats


def run_dir(layout: Layout, stage: int, tag: str = "") -> Path:
    return layout.checkpoints / f"stage{stage}{'-' + tag if tag else ''}"


def run_stage(preset: Preset, layout: Layout, model: LlavaLite, tokenizer, feats, stage: int, samples: list[dict],
              out: Path, resume: bool = False, progress: bool = True, **overrides) -> dict:
    """Train ``model`` through stage ``stage`` on ``samples`` (features from ``feats``)."""
    from dataclasses import replace

    from .train import train

    cfg = replace(preset.stage1 if stage == 1 else preset.stage2, **overrides)
    _, examples, stats = stage_examples(preset, tokenizer, samples, stage, model.config.num_image_tokens)
    log.info("stage %d: %s", stage, dict(stats))
    collate = Collator(tokenizer.pad_token_id, features=feats)
    summary = train(model, examples, collate, cfg, out, resume=resume, progress=progress)
    summary["examples"] = dict(stats)
    model.config.save(out)
    return summary


def prepare_stage2(preset: Preset, model: LlavaLite, stage1_checkpoint: Path | None) -> LlavaLite:
    """Load the stage-1 projector (checked against this model) and add LoRA if the preset asks."""
    from .train import load_trained

    if stage1_checkpoint is not None:
        LlavaConfig.load(stage1_checkpoint).check_compatible(model.config, f"stage-1 checkpoint {stage1_checkpoint}")
        load_trained(model, stage1_checkpoint)
    if preset.model.lora:
        apply_lora(model, r=preset.model.lora_r, alpha=preset.model.lora_alpha)
    return model
