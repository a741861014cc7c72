"""The two training stages put together for a preset: what the notebooks and ``llava-lite train``
/ ``llava-lite evaluate`` call. Each function is a few lines over the modules that do the work.

    load_language / load_vision      the pretrained parts (shipped tiny ones, or hub/open_clip names)
    language_shape / vision_shape    the parts' shapes from their configs alone
    memory_estimate                  a preset's training memory from those shapes (meta device)
    build_llava                      vision width -> projector -> LM, with <image> in the tokenizer
    split_features                   the feature cache of a split (extracted when missing)
    stage_samples / stage_examples   a split's LLaVA samples of a stage -> tokenised examples
    run_key / run_dir                a run's folder, named by the settings it depends on
    run_stage                        stage 1 or 2 through the one training loop
    prepare_stage2                   the stage-1 projector in place, LoRA adapters when asked
    load_stage                       a trained stage back from its checkpoint
    train_stage / evaluate_checkpoint   what ``llava-lite train`` / ``llava-lite evaluate`` run
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import open_clip
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from . import features as fc
from . import hub, io, memory
from .config import PRESETS, LanguageConfig, LlavaConfig, Preset, VisionConfig, get_preset
from .conversation import get_template
from .data import Collator, encode_samples
from .evaluate import ask_llava, blind_samples, exact_items, records, save, score
from .model import LlavaLite, add_image_token, apply_lora
from .paths import PRETRAINED_DIR, Layout
from .train import NOT_COMPARED, latest_checkpoint, load_trained, make_accelerator, set_trainable, train
from .vision import SHIPPED as SHIPPED_TOWERS
from .vision import VisionTower

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# "instruct": a sample of LLaVA's released instruction files whose type the file does not state
STAGE_TYPES = {1: ("caption",), 2: ("conversation", "detail", "complex", "exact", "instruct")}


def resolve(name: str) -> str:
    """A short name of ``data/pretrained/`` -> its folder; a folder unchanged; a hub id -> its
    snapshot folder in the Hugging Face cache (downloaded first when missing and reachable)."""
    shipped = PRETRAINED_DIR / name
    if shipped.is_dir():
        return str(shipped)
    if Path(name).is_dir():
        return name
    if name in ("tiny-lm", "tiny-clip"):
        raise FileNotFoundError(f"{shipped}: the shipped {name} is missing (retrain it: llava-lite backbones)")
    return str(hub.snapshot(name, hub.LM_FILES, what="language model"))


def load_language(cfg: LanguageConfig):
    """``(lm, tokenizer)``: the shipped tiny LM, a local folder, or a hub model (the real path)."""
    where = resolve(cfg.name)
    tokenizer = AutoTokenizer.from_pretrained(where)
    with hub.quiet_loading():
        if cfg.load_in_4bit:
            return _load_4bit(where, cfg), tokenizer
        lm = AutoModelForCausalLM.from_pretrained(where, dtype=DTYPES[cfg.dtype], attn_implementation=cfg.attn)
    return lm, tokenizer


def qlora_available() -> str | None:
    """``None`` when a 4-bit base can be loaded here, else why not (in words)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    return None


def _load_4bit(where: str, cfg: LanguageConfig):
    """The QLoRA base: weights quantised to 4-bit NF4 as they load, computing in bf16 (fp16 on
    cards without bf16), prepared for k-bit training (norms in fp32, input gradients on)."""
    from peft import prepare_model_for_kbit_training  # peft takes seconds to import, and only QLoRA needs it

    why_not = qlora_available()
    if why_not:
        raise RuntimeError(
            f"language.load_in_4bit (QLoRA) for {cfg.name}: {why_not}. Set load_in_4bit=False and "
            "use LoRA (model.lora=True) on full-precision weights instead."
        )
    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )
    lm = AutoModelForCausalLM.from_pretrained(
        where, quantization_config=quant, dtype=compute, device_map={"": 0}, attn_implementation=cfg.attn
    )
    return prepare_model_for_kbit_training(lm, use_gradient_checkpointing=False)


def load_vision(cfg: VisionConfig) -> VisionTower:
    """The preset's frozen vision tower (shipped tiny CLIP, a folder, or an open_clip name)."""
    return VisionTower.load(cfg.encoder, cfg.pretrained, layer=cfg.layer, keep_cls=cfg.keep_cls)


def lm_fingerprint(lm) -> str:
    """A digest of a language model's weights, cheap at any size: the shape of its input
    embeddings and 4096 of their values taken at a fixed stride, in bf16 (the same model loaded in
    fp32, bf16 or under a 4-bit base agrees; embeddings are never quantised). A checkpoint made
    over another language model of the same width carries another digest."""
    w = lm.get_input_embeddings().weight.detach()
    flat = w.flatten()
    sample = flat[:: max(1, flat.numel() // 4096)][:4096].to("cpu", torch.bfloat16).float()
    return hashlib.sha1(f"{tuple(w.shape)}".encode() + sample.numpy().tobytes()).hexdigest()[:16]


# the presets' hub language models as their config.json describes them: the memory estimate of a
# preset is made from these shapes before anything is downloaded (a cached config.json wins)
LM_SHAPES = {
    "HuggingFaceTB/SmolLM2-360M-Instruct": {"model_type": "llama", "vocab_size": 49152, "hidden_size": 960,
        "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15, "num_key_value_heads": 5,
        "tie_word_embeddings": True},
    "Qwen/Qwen2.5-1.5B-Instruct": {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536,
        "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
        "tie_word_embeddings": True},
}  # fmt: skip


def language_shape(name: str):
    """A language model's config (its shapes, no weights): the shipped or local folder's, the
    Hugging Face cache's, else the one :data:`LM_SHAPES` records."""
    folder = PRETRAINED_DIR / name if (PRETRAINED_DIR / name).is_dir() else Path(name)
    cached = folder / "config.json" if folder.is_dir() else hub.cached_file(name, ["config.json"])
    if cached is not None and Path(cached).is_file():
        return AutoConfig.from_pretrained(Path(cached).parent)
    if name not in LM_SHAPES:
        raise FileNotFoundError(f"{name}: no config.json in a folder or the cache, and no recorded shape")
    shape = dict(LM_SHAPES[name])
    return AutoConfig.for_model(shape.pop("model_type"), **shape)


def vision_shape(cfg: VisionConfig) -> tuple[int, int]:
    """``(width, tokens per image)`` of a vision tower from its open_clip config alone."""
    folder = SHIPPED_TOWERS.get(cfg.encoder, Path(cfg.encoder))
    if folder.is_dir():
        vision = io.read_json(folder / "open_clip_config.json")["model_cfg"]["vision_cfg"]
    else:
        vision = open_clip.get_model_config(cfg.encoder)["vision_cfg"]
    return vision["width"], (vision["image_size"] // vision["patch_size"]) ** 2 + int(cfg.keep_cls)


def memory_estimate(preset: Preset, stage: int, lora: bool | None = None) -> memory.Estimate:
    """The memory a stage of ``preset`` needs per device (:func:`llava_lite.memory.estimate`), from
    the shapes alone: the model is built on PyTorch's meta device, so a ``colab`` or ``full`` preset
    is estimated on any machine, with nothing downloaded or allocated (``lora``: default the preset's;
    precision ``auto`` is counted as fp32, what a CPU trains in)."""
    lm_cfg = language_shape(preset.language.name)
    width, tokens = vision_shape(preset.vision)
    train_cfg = preset.stage1 if stage == 1 else preset.stage2
    config = LlavaConfig("shapes", width, tokens, preset.language.name, lm_cfg.hidden_size, preset.model.projector_type)
    with torch.device("meta"):
        model = LlavaLite(config, AutoModelForCausalLM.from_config(lm_cfg, dtype=DTYPES[preset.language.dtype]))
        if stage == 2 and (preset.model.lora if lora is None else lora):
            apply_lora(model, r=preset.model.lora_r, alpha=preset.model.lora_alpha)
    set_trainable(model, stage)
    micro = train_cfg.batch_size // train_cfg.grad_accum
    precision = "fp32" if train_cfg.precision == "auto" else train_cfg.precision
    meta = torch.device("meta")
    return memory.estimate(model, micro, preset.model.max_len, precision, train_cfg.gradient_checkpointing, meta)


def build_llava(preset: Preset, lm, tokenizer, tower, with_tower: bool = False, seed: int | None = None) -> LlavaLite:
    """A fresh LLaVA over ``lm`` and ``tower``'s features; its untrained projector is drawn from
    ``seed`` (default: the stage-1 seed), so the same preset always starts from the same weights."""
    image_id = add_image_token(tokenizer, lm)
    cfg = LlavaConfig(
        vision_key=tower.cache_key,
        vision_dim=tower.width,
        num_image_tokens=tower.num_patches,
        lm_name=preset.language.name,
        lm_dim=lm.config.hidden_size,
        projector_type=preset.model.projector_type,
        image_token_id=image_id,
        lm_fingerprint=lm_fingerprint(lm),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(preset.stage1.seed if seed is None else seed)
        return LlavaLite(cfg, lm, vision=tower if with_tower else None)


def split_features(layout: Layout, split: str, tower: VisionTower, progress: bool = True) -> fc.FeatureReader:
    """The feature cache of ``split`` for ``tower`` (extracted first when missing or unfinished)."""
    if not layout.instances(split).exists():
        raise FileNotFoundError(
            f"{layout.instances(split)}: no {split} split yet "
            f"(run notebook 00 or `llava-lite world --preset {layout.root.name}`)"
        )
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


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._" else "-" for c in text).strip("-")


def run_key(preset: Preset, stage: int) -> str:
    """What a stage's run depends on, where it differs from the named preset's defaults: the
    vision encoder, its layer and CLS choice, the projector, the language model and the templates
    (stage 2 depends on stage 1's too). ``""`` for the preset as shipped, so its runs keep the plain
    folder names; ``"layer-1-linear"`` for a linear projector over the last layer."""
    base = PRESETS[preset.name]() if preset.name in PRESETS else Preset(name=preset.name)
    v, b = preset.vision, base.vision
    parts = []
    if (v.encoder, v.pretrained) != (b.encoder, b.pretrained):
        parts.append(_slug(f"{Path(v.encoder).name}-{v.pretrained or 'local'}"))
    if v.layer != b.layer:
        parts.append(f"layer{v.layer}")
    if v.keep_cls != b.keep_cls:
        parts.append("cls" if v.keep_cls else "nocls")
    if preset.model.projector_type != base.model.projector_type:
        parts.append(preset.model.projector_type)
    if preset.language.name != base.language.name:
        digest = hashlib.sha1(preset.language.name.encode()).hexdigest()[:6]
        parts.append(f"lm-{_slug(Path(preset.language.name).name)}-{digest}")
    if preset.model.stage1_template != base.model.stage1_template:
        parts.append(f"{'' if stage == 1 else 's1'}{preset.model.stage1_template}")
    if stage == 2 and preset.model.stage2_template != base.model.stage2_template:
        parts.append(preset.model.stage2_template)
    return "-".join(parts)


def run_dir(layout: Layout, stage: int, tag: str = "", preset: Preset | None = None) -> Path:
    """The run folder of a stage: ``checkpoints/stage<N>[-<settings>][-<tag>]``. With ``preset``,
    the settings it changes (:func:`run_key`) name the folder, so a run with a linear projector or
    another layer lives beside the default one and is found again by the same settings."""
    name = "-".join(p for p in (f"stage{stage}", run_key(preset, stage) if preset else "", tag) if p)
    return layout.checkpoints / name


def run_fingerprint(cfg, model: LlavaLite, samples: list[dict]) -> str:
    """What makes two runs the same run: the stage's settings, the samples, the model it starts
    from (its config, its projector's weights, LoRA or not); how it logs, saves or pauses is not."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_COMPARED}
    h = hashlib.sha1(json.dumps([settings, samples, asdict(model.config)], sort_keys=True, default=str).encode())
    h.update(str(any("lora_" in n for n, _ in model.named_parameters())).encode())
    for name, p in sorted(model.projector.state_dict().items()):
        h.update(name.encode() + p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def should_resume(out: Path, fingerprint: str) -> bool:
    """``True`` when ``out`` holds a checkpoint of this very run (a notebook rerun after a disconnect).
    A folder of another run is cleared of its checkpoints, so a later rerun never resumes from them."""
    out = Path(out)
    stamp = out / "run.json"
    same = stamp.exists() and io.read_json(stamp).get("fingerprint") == fingerprint
    if same and latest_checkpoint(out) is not None:
        return True
    if not same and (out / "latest.json").exists():
        log.info("%s holds another run's checkpoints; starting this run afresh", out)
        (out / "latest.json").unlink()
        for old in out.glob("checkpoint-*"):
            shutil.rmtree(old)
    io.write_json(stamp, {"fingerprint": fingerprint})
    return False


def run_stage(
    preset: Preset,
    model: LlavaLite,
    tokenizer,
    feats,
    stage: int,
    samples: list[dict],
    out: Path,
    resume: bool | None = None,
    progress: bool = True,
    accelerator=None,
    **overrides,
) -> dict:
    """Train ``model`` through stage ``stage`` on ``samples`` (features from ``feats``). ``resume``
    ``None`` (the default): go on from the run folder's last checkpoint when it holds this same run
    (same settings, samples and starting model), else start afresh; ``True`` / ``False`` force it."""
    cfg = replace(preset.stage1 if stage == 1 else preset.stage2, **overrides)
    _, examples, stats = stage_examples(preset, tokenizer, samples, stage, model.config.num_image_tokens)
    log.info("stage %d: %s", stage, dict(stats))
    collate = Collator(tokenizer.pad_token_id, features=feats)
    if resume is None:
        is_main = accelerator is None or accelerator.is_main_process
        resume = (
            should_resume(out, run_fingerprint(cfg, model, samples)) if is_main else latest_checkpoint(out) is not None
        )
    summary = train(model, examples, collate, cfg, out, resume=resume, progress=progress, accelerator=accelerator)
    summary["examples"] = dict(stats)
    return summary


def prepare_stage2(
    preset: Preset, model: LlavaLite, stage1_checkpoint: Path | None, lora: bool | None = None, seed: int | None = None
) -> LlavaLite:
    """Load the stage-1 projector (checked against this model) and add LoRA adapters when
    ``lora`` (default: the preset's choice) says so, drawn from ``seed`` when one is given."""
    if stage1_checkpoint is not None:
        LlavaConfig.load(stage1_checkpoint).check_compatible(model.config, f"stage-1 checkpoint {stage1_checkpoint}")
        load_trained(model, stage1_checkpoint)
    use_lora = preset.model.lora if lora is None else lora
    if getattr(model.lm, "is_loaded_in_4bit", False) and not use_lora:
        raise ValueError(
            "the language model was loaded in 4 bits (language.load_in_4bit): its weights cannot be "
            "fine-tuned in full; turn on model.lora (QLoRA trains adapters over the 4-bit base)"
        )
    if use_lora:
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            apply_lora(model, r=preset.model.lora_r, alpha=preset.model.lora_alpha)
    return model


def load_stage(preset: Preset, checkpoint: Path, tower=None):
    """A trained model back from a checkpoint folder: ``(model, tokenizer)``. LoRA adapters are
    put in place first when the checkpoint holds them."""
    checkpoint = Path(checkpoint)
    tower = tower or load_vision(preset.vision)
    lm, tokenizer = load_language(preset.language)
    model = build_llava(preset, lm, tokenizer, tower)
    LlavaConfig.load(checkpoint).check_compatible(model.config, f"checkpoint {checkpoint}")
    with safe_open(str(checkpoint / "trainable.safetensors"), "pt") as f:
        if any("lora_" in k for k in f.keys()):
            apply_lora(model, r=preset.model.lora_r, alpha=preset.model.lora_alpha)
    load_trained(model, checkpoint)
    return model, tokenizer


def train_stage(
    preset_name: str | Preset,
    stage: int,
    out: Path | None = None,
    stage1: Path | None = None,
    resume: bool = False,
    blind: bool = False,
    lora: bool | None = None,
    seed: int | None = None,
    **overrides,
) -> dict:
    """What ``llava-lite train`` runs: stage 1 or 2 of a preset on its ``train`` split, in one process
    or as one of several (``torchrun``, ``accelerate launch``); ``overrides`` replace the stage's
    settings (``max_steps``, ``lr``, ``lm_lr``, ``batch_size``). ``preset_name``: a preset's name or a
    changed preset (another layer, projector or LM), whose runs live in folders of their own."""
    preset = preset_name if isinstance(preset_name, Preset) else get_preset(preset_name)
    layout = Layout.for_preset(preset.name)
    acc = make_accelerator((preset.stage1 if stage == 1 else preset.stage2).precision)
    tower = load_vision(preset.vision)
    with acc.main_process_first():
        feats = None if blind else split_features(layout, "train", tower, progress=acc.is_main_process)
    lm, tokenizer = load_language(preset.language)
    model = build_llava(preset, lm, tokenizer, tower, seed=seed)
    out = out or run_dir(layout, stage, "blind" if blind else "", preset)
    samples = stage_samples(layout, "train", stage)
    if stage == 2:
        ckpt = stage1 or latest_checkpoint(run_dir(layout, 1, preset=preset))
        if ckpt is None and not blind:
            raise FileNotFoundError(
                f"no stage-1 checkpoint under {run_dir(layout, 1, preset=preset)}: "
                "run `llava-lite train --stage 1` first"
            )
        prepare_stage2(preset, model, None if blind else ckpt, lora, seed)
        samples = blind_samples(samples) if blind else samples
    if seed is not None:
        overrides["seed"] = seed
    return run_stage(preset, model, tokenizer, feats, stage, samples, out, resume=resume, accelerator=acc, **overrides)


def evaluate_checkpoint(
    preset_name: str | Preset,
    checkpoint: Path | None = None,
    split: str = "test",
    out: Path | None = None,
    blind: bool = False,
) -> dict:
    """What ``llava-lite evaluate`` runs: the exact-answer score of a trained model on ``split``,
    its per-question records written beside the checkpoint (or to ``out``); ``blind``: a model
    trained without image tokens, asked without them. ``preset_name``: a name or a changed preset."""
    preset = preset_name if isinstance(preset_name, Preset) else get_preset(preset_name)
    layout = Layout.for_preset(preset.name)
    run = run_dir(layout, 2, "blind" if blind else "", preset)
    ckpt = checkpoint or latest_checkpoint(run)
    if ckpt is None:
        raise FileNotFoundError(f"no stage-2 checkpoint under {run}; pass --checkpoint")
    tower = load_vision(preset.vision)
    model, tokenizer = load_stage(preset, ckpt, tower)
    items = exact_items(io.read_json(layout.instruct / f"{split}.json"))
    template = get_template(preset.model.stage2_template, tokenizer)
    feats = None if blind else split_features(layout, split, tower)
    recs = records(items, ask_llava(model, template, tokenizer, items, feats, blind=blind, progress=True))
    summary = score(recs)
    save(out or Path(ckpt) / f"exact_{split}.json", recs, summary)
    return summary
