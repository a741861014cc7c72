"""Take the model out: a trained checkpoint as a Hugging Face Llava folder that
``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained`` load with
no code of ours, and that ``transformers serve`` and ``pipeline("image-text-to-text")`` run.

What becomes what::

    open_clip ViT (frozen)       -> CLIPVisionModel: the fused in_proj split into q/k/v
    our layer, CLS kept/dropped  -> vision_feature_layer, vision_feature_select_strategy
    projector                    -> multi_modal_projector: mlp2x_gelu as is; the paper's linear as
                                    linear_1, act "linear", linear_2 = identity (exact)
    language model (+ LoRA)      -> language_model + lm_head, adapters merged
    tokenizer, stage-2 template  -> tokenizer with <image>; a chat template that flattens content
                                    lists (parts joined by newlines, an image as <image>), then renders ours
    tower.preprocess             -> LlavaImageProcessor: pad to square with the mean colour,
                                    bicubic resize to the input size, CLIP mean/std

:func:`compare` runs our model and the export side by side on one image and question;
:func:`name_map` says which of our tensors became which of theirs; :func:`serve` runs the folder
behind ``transformers serve`` and :func:`ask_served` asks it about a picture, as any client would.

The processor's pixels equal ours for square images at the tower's input size (the shapes
world's). Padding and resizing differ a little in transformers 5.x: it pads with ``int(mean*255)``
where we round, and ``AutoProcessor`` resizes with torchvision whatever class the folder names
(we use PIL, with ``reducing_gap``). Measured: at most 2/255 after padding, 1/255 for a 2x
downscale, 5-6/255 beyond 6x.
"""

from __future__ import annotations

import base64
import copy
import io as stdio
import logging
import os
import re
import shutil
import socket
import string
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    LlavaProcessor,
)

from . import hub, io
from .config import Preset, get_preset
from .conversation import IMAGE_TOKEN, Template, get_template
from .generate import evaluating, question_prompt, stop_id
from .model import LlavaLite, merge_lora
from .paths import Layout
from .stages import STAGE_TYPES, load_stage, load_vision, run_dir
from .teachers.endpoint import ChatEndpoint, Completion
from .train import latest_checkpoint
from .vision import VisionTower, load_image

log = logging.getLogger(__name__)
CARD_TEMPLATE = Path(__file__).with_name("export_card.md")
ACTIVATIONS = {"GELU": "gelu", "QuickGELU": "quick_gelu"}
# where each part of ours sits inside LlavaForConditionalGeneration (to_hf loads it there)
HF_PARTS = {
    "vision": "model.vision_tower",
    "projector": "model.multi_modal_projector",
    "language": "model.language_model",
    "head": "lm_head",
}
# what each file of an export holds
FILES = {
    "config.json": "the architecture: CLIP vision config, language-model config, image token id, projector "
    "activation, feature layer and CLS choice, image tokens per picture",
    "model.safetensors": "every weight: vision tower, projector, language model (LoRA merged)",
    "generation_config.json": "greedy decoding that stops at the template's end-of-turn token",
    "processor_config.json": "the image preprocessing (pad to square, resize, mean/std) and how many slots "
    "<image> grows to",
    "tokenizer.json": "the tokenizer, <image> included",
    "tokenizer_config.json": "the tokenizer's class and special tokens",
    "chat_template.jinja": "the chat template: content lists flattened, then our stage-2 template",
    "README.md": "the model card: preset, data, training, measured scores",
}

# content lists (what apply_chat_template and servers send) -> one string per message, its parts
# joined by newlines, an image as <image>: "<image>\nQ" or "Q\n<image>" as in our samples; the
# stage-2 template is appended after this preamble and renders the flattened messages
FLATTEN = (
    "{%- set flat = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set flat.messages = flat.messages + [message] -%}"
    "{%- else -%}"
    "{%- set text = namespace(parts=[]) -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set text.parts = text.parts + ['" + IMAGE_TOKEN + "'] -%}"
    "{%- elif part['type'] == 'text' -%}{%- set text.parts = text.parts + [part['text']] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set flat.messages = flat.messages + [{'role': message['role'], 'content': text.parts | join('\\n')}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = flat.messages -%}"
)
# the roles template (conversation.RoleTokenTemplate) as Jinja, for a tokenizer without its own
ROLES_JINJA = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}<|end|>"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}<|end|>"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# ------------------------------------------------------------------ the vision tower
def _check_convertible(tower: VisionTower) -> None:
    """Only a plain pre-norm ViT maps one to one onto CLIPVisionModel; anything else is named."""
    v = tower.visual
    problems = []
    if getattr(v, "class_embedding", None) is None:
        problems.append("no CLS token")
    if getattr(v, "attn_pool", None) is not None:
        problems.append("attentional pooling")
    if v.conv1.bias is not None:
        problems.append("a patch embedding with bias")
    if not isinstance(v.ln_pre, torch.nn.LayerNorm):
        problems.append("no pre-norm (ln_pre)")
    for i, block in enumerate(v.transformer.resblocks):
        if not isinstance(block.ls_1, torch.nn.Identity) or not isinstance(block.ls_2, torch.nn.Identity):
            problems.append(f"layer scale in block {i}")
        if getattr(block, "ln_1_kv", None) is not None or not isinstance(block.attn, torch.nn.MultiheadAttention):
            problems.append(f"a non-standard attention in block {i}")
        parts = [name for name, _ in block.mlp.named_children()]
        if parts != ["c_fc", "gelu", "c_proj"]:
            problems.append(f"an MLP of {parts} in block {i}")
        elif type(act := block.mlp.gelu).__name__ not in ACTIVATIONS or getattr(act, "approximate", "none") != "none":
            problems.append(f"activation {act} in block {i}")
    if problems:
        raise ValueError(f"{tower.name}: cannot be written as a CLIPVisionModel: {'; '.join(sorted(set(problems)))}")


def clip_vision_config(tower: VisionTower) -> CLIPVisionConfig:
    """The CLIPVisionConfig of an open_clip ViT (exact: same widths, heads, GELU, LayerNorm eps)."""
    _check_convertible(tower)
    blocks = tower.visual.transformer.resblocks
    return CLIPVisionConfig(
        hidden_size=tower.width,
        intermediate_size=blocks[0].mlp.c_fc.out_features,
        num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads,
        image_size=tower.image_size,
        patch_size=tower.patch_size,
        hidden_act=ACTIVATIONS[type(blocks[0].mlp.gelu).__name__],
        layer_norm_eps=blocks[0].ln_1.eps,
        projection_dim=tower.width,
    )


def clip_vision_names(tower: VisionTower) -> dict[str, tuple[str, int | None]]:
    """CLIPVisionModel's parameter names -> ``(open_clip name under visual, part)``; ``part`` is
    which third (q, k, v) of a block's fused ``in_proj`` it is, None for a tensor taken whole."""
    names = {
        "embeddings.class_embedding": ("class_embedding", None),
        "embeddings.patch_embedding.weight": ("conv1.weight", None),
        "embeddings.position_embedding.weight": ("positional_embedding", None),
        "pre_layrnorm.weight": ("ln_pre.weight", None),
        "pre_layrnorm.bias": ("ln_pre.bias", None),
        "post_layernorm.weight": ("ln_post.weight", None),
        "post_layernorm.bias": ("ln_post.bias", None),
    }
    pairs = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}  # fmt: skip
    for i in range(len(tower.visual.transformer.resblocks)):
        p, o = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for part, qkv in enumerate(("q_proj", "k_proj", "v_proj")):  # [3D, D] -> 3 x [D, D]
            names[f"{p}self_attn.{qkv}.weight"] = (o + "attn.in_proj_weight", part)
            names[f"{p}self_attn.{qkv}.bias"] = (o + "attn.in_proj_bias", part)
        for theirs, ours in pairs.items():
            for kind in ("weight", "bias"):
                names[f"{p}{theirs}.{kind}"] = (f"{o}{ours}.{kind}", None)
    return names


def clip_vision_state(tower: VisionTower) -> dict[str, torch.Tensor]:
    """open_clip weights under CLIPVisionModel's names; each block's fused ``in_proj`` split in three."""
    params = dict(tower.visual.named_parameters())
    out = {}
    for theirs, (ours, part) in clip_vision_names(tower).items():
        t = params[ours] if part is None else params[ours].chunk(3)[part]
        out[theirs] = t.detach().clone().contiguous()
    return out


def feature_choice(tower: VisionTower) -> tuple[int, str]:
    """``(vision_feature_layer, vision_feature_select_strategy)`` for our layer and CLS choice.

    HF's ``hidden_states`` has one more entry than there are blocks (the embeddings come first),
    so the output of block ``b`` is ``hidden_states[b + 1]``, written counting from the end;
    "default" drops the first token (CLS), "full" keeps it."""
    return tower.block_index - tower.num_blocks, "full" if tower.keep_cls else "default"


def image_processor(tower: VisionTower) -> LlavaImageProcessor:
    """Our preprocessing as a LlavaImageProcessor: pad to square with the mean colour, bicubic
    resize to ``image_size`` squared, no crop, rescale by 1/255 and normalise with the tower's mean/std."""
    s = tower.image_size
    return LlavaImageProcessor(
        do_pad=True,
        do_resize=True,
        size={"height": s, "width": s},
        resample=Image.BICUBIC,
        do_center_crop=False,
        crop_size={"height": s, "width": s},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=tower.mean.flatten().tolist(),
        image_std=tower.std.flatten().tolist(),
        do_convert_rgb=True,
    )


# ------------------------------------------------------------------ text side
def chat_template(tokenizer, template_name: str) -> str:
    """The export's chat template: content lists flattened, then the stage-2 template rendered."""
    if template_name == "chat":
        base = tokenizer.chat_template
        if not base:
            raise ValueError("the stage-2 template is 'chat' but the tokenizer has no chat_template")
    elif template_name == "roles":
        base = ROLES_JINJA
    else:
        raise ValueError(
            f"cannot export a model asked with the {template_name!r} template: a chat export needs the "
            "stage-2 template 'chat' or 'roles' (export a stage-2 checkpoint)"
        )
    return FLATTEN + base


def projector_state(model: LlavaLite) -> tuple[str, dict[str, torch.Tensor]]:
    """``(projector_hidden_act, weights)`` of HF's ``linear_1 -> act -> linear_2`` for our projector."""
    p = model.projector
    state = {"linear_1.weight": p.linear_1.weight, "linear_1.bias": p.linear_1.bias}
    if p.kind == "mlp2x_gelu":
        act = "gelu"
        state |= {"linear_2.weight": p.linear_2.weight, "linear_2.bias": p.linear_2.bias}
    else:  # the paper's single linear layer: an identity second layer adds nothing, exactly
        act = "linear"
        d = p.linear_1.out_features
        dtype = p.linear_1.weight.dtype
        state |= {"linear_2.weight": torch.eye(d, dtype=dtype), "linear_2.bias": torch.zeros(d, dtype=dtype)}
    return act, {k: t.detach().clone() for k, t in state.items()}


# ------------------------------------------------------------------ the whole model
def to_hf(model: LlavaLite, tokenizer, tower: VisionTower, template_name: str):
    """``(LlavaForConditionalGeneration, LlavaProcessor)`` equal to ``model`` over ``tower``.

    LoRA adapters are merged into ``model``'s language model in place (one model in memory)."""
    if tower.cache_key != model.config.vision_key:
        raise ValueError(f"the tower is {tower.cache_key} but the model was trained on {model.config.vision_key}")
    if hasattr(model.lm, "peft_config"):
        merge_lora(model)
    lm = model.lm
    layer, strategy = feature_choice(tower)
    act, proj = projector_state(model)
    text_config = lm.config.to_dict()
    text_config["vocab_size"] = lm.get_input_embeddings().num_embeddings
    config = LlavaConfig(
        vision_config=clip_vision_config(tower).to_dict(),
        text_config=text_config,
        image_token_index=model.image_token_id,
        image_seq_length=tower.num_patches,
        projector_hidden_act=act,
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    dtype = lm.get_input_embeddings().weight.dtype
    hf = LlavaForConditionalGeneration(config)
    hf.get_submodule(HF_PARTS["vision"]).load_state_dict(clip_vision_state(tower))
    hf.get_submodule(HF_PARTS["projector"]).load_state_dict(proj)
    hf.get_submodule(HF_PARTS["language"]).load_state_dict(getattr(lm, lm.base_model_prefix).state_dict())
    hf.get_submodule(HF_PARTS["head"]).load_state_dict(lm.get_output_embeddings().state_dict())
    hf.to(dtype).eval()
    stop = stop_id(tokenizer)
    hf.generation_config = GenerationConfig(
        do_sample=False,
        eos_token_id=stop,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    template = chat_template(tokenizer, template_name)
    tokenizer = copy.deepcopy(tokenizer)  # the caller's tokenizer keeps its own template
    tokenizer.chat_template = template
    processor = LlavaProcessor(
        image_processor=image_processor(tower),
        tokenizer=tokenizer,
        patch_size=tower.patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # open_clip ViTs carry a CLS token
    )
    return hf, processor


def name_map(model: LlavaLite, tower: VisionTower, collapse: bool = False) -> list[dict]:
    """Each tensor of the export: ``{"part", "ours", "hf", "how"}``, our parameter name (the tower's
    under ``visual.``) beside the name ``LlavaForConditionalGeneration`` gives it, and how it is made.
    ``collapse``: one row per tensor kind, layer numbers written ``N``, with a ``tensors`` count."""
    rows = []
    for theirs, (ours, part) in clip_vision_names(tower).items():
        how = "copied" if part is None else f"{'qkv'[part]} third of the fused in_proj"
        rows.append(("vision tower", "visual." + ours, f"{HF_PARTS['vision']}.{theirs}", how))
    for name in projector_state(model)[1]:
        real = f"projector.{name}" in model.state_dict()
        ours, how = (f"projector.{name}", "copied") if real else ("-", "identity: the paper's linear projector")
        rows.append(("projector", ours, f"{HF_PARTS['projector']}.{name}", how))
    lm, prefix = model.lm, "lm."
    if hasattr(lm, "peft_config"):  # described as exported: adapters merged into the base weights
        lm, prefix = lm.get_base_model(), "lm.base_model.model."
    inner = getattr(lm, lm.base_model_prefix)
    for name in inner.state_dict():
        if "lora_" not in name:
            how = "LoRA merged in" if ".base_layer." in name else "copied"
            theirs = name.replace(".base_layer.", ".")
            rows.append(
                ("language model", f"{prefix}{lm.base_model_prefix}.{name}", f"{HF_PARTS['language']}.{theirs}", how)
            )
    tied = bool(getattr(lm.config, "tie_word_embeddings", False))
    rows.append(
        ("head", f"{prefix}lm_head.weight", f"{HF_PARTS['head']}.weight", "tied to embed_tokens" if tied else "copied")
    )
    rows = [dict(zip(("part", "ours", "hf", "how"), r)) for r in rows]
    if not collapse:
        return rows
    grouped: dict[tuple, dict] = {}
    for r in rows:
        short = {k: re.sub(r"\.\d+\.", ".N.", v) for k, v in r.items()}
        grouped.setdefault(tuple(short.values()), short | {"tensors": 0})["tensors"] += 1
    return list(grouped.values())


# ------------------------------------------------------------------ the folder
def export(
    checkpoint: str | Path | None,
    out: str | Path,
    preset: str | Preset = "tiny",
    scores: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a stage-2 ``checkpoint`` as a Hugging Face Llava folder ``out`` (model, processor,
    generation config, model card); written beside ``out`` first, then renamed into place.
    ``checkpoint`` None: the preset's latest stage-2 checkpoint. ``scores``: measured results for
    the card, besides the ``exact_*.json`` files found in the checkpoint."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if checkpoint is None:
        checkpoint = latest_checkpoint(run_dir(Layout.for_preset(preset.name), 2, preset=preset))
        if checkpoint is None:
            raise FileNotFoundError(f"no stage-2 checkpoint for preset {preset.name!r}; pass --checkpoint")
    checkpoint, out = Path(checkpoint), Path(out)
    if not (checkpoint / "trainable.safetensors").is_file():
        raise FileNotFoundError(f"{checkpoint}: not a llava-lite checkpoint (no trainable.safetensors)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out}: exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    tower = load_vision(preset.vision)
    model, tokenizer = load_stage(preset, checkpoint, tower)
    lora = hasattr(model.lm, "peft_config")  # merged by to_hf
    hf, processor = to_hf(model, tokenizer, tower, preset.model.stage2_template)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "README.md").write_text(model_card(preset, checkpoint, out, tower, hf, lora, scores))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("exported %s to %s (%d image tokens)", checkpoint, out, hf.config.image_seq_length)
    return out


def _scores_found(checkpoint: Path) -> dict:
    found = {}
    for path in sorted(checkpoint.glob("exact_*.json")):
        found[f"exact-answer accuracy, {path.stem.removeprefix('exact_')} split"] = io.read_json(path)["summary"]
    return found


def _score_lines(scores: dict) -> str:
    if not scores:
        return "None measured for this checkpoint (run `llava-lite evaluate --checkpoint ...` before exporting)."
    lines = []
    for name, s in scores.items():
        if isinstance(s, dict) and "overall" in s:
            per = ", ".join(f"{t} {a:.3f}" for t, a in s.get("accuracy", {}).items())
            lines.append(f"- {name}: **{s['overall']:.3f}** over {s.get('questions', '?')} questions ({per})")
            if s.get("baseline"):
                base = ", ".join(f"{t} {a:.3f}" for t, a in s["baseline"].items())
                lines.append(f"  - most-common-answer baseline per type: {base}")
        else:
            lines.append(f"- {name}: {s}")
    return "\n".join(lines)


def _training_data(preset: Preset) -> str:
    path = Layout.for_preset(preset.name).instruct / "train.json"
    if not path.is_file():
        return f"the instruction data ({path}) was not found at export time"
    counts = Counter(s.get("type") for s in io.read_json(path) if s.get("type") in STAGE_TYPES[2])
    return f"{sum(counts.values())} samples ({', '.join(f'{t} {n}' for t, n in sorted(counts.items()))})"


def model_card(
    preset: Preset, checkpoint: Path, out: Path, tower: VisionTower, hf, lora: bool, scores: dict | None
) -> str:
    """The export's README.md: the card template (``export_card.md``) filled from the preset, the
    run's own files (``summary.json``, ``train_state.pt``) and the measured scores."""
    run = checkpoint.parent / "summary.json"
    summary = io.read_json(run) if run.is_file() else {}
    state = checkpoint / "train_state.pt"
    train_cfg = torch.load(state, weights_only=False).get("train_config", {}) if state.is_file() else {}
    c = hf.config
    values = {
        "preset": preset.name,
        "checkpoint": checkpoint.as_posix(),
        "out": out.as_posix(),
        "vision": f"{preset.vision.encoder}" + (f" ({preset.vision.pretrained})" if preset.vision.pretrained else ""),
        "layer": preset.vision.layer,
        "cls": "kept" if tower.keep_cls else "dropped",
        "feature_layer": c.vision_feature_layer,
        "strategy": c.vision_feature_select_strategy,
        "image_size": tower.image_size,
        "patch": tower.patch_size,
        "image_tokens": c.image_seq_length,
        "language": preset.language.name,
        "projector": preset.model.projector_type,
        "act": c.projector_hidden_act,
        "lora": f"LoRA r={preset.model.lora_r} alpha={preset.model.lora_alpha}, merged" if lora else "fully fine-tuned",
        "template": preset.model.stage2_template,
        "train_scenes": preset.world.splits.get("train", "?"),
        "teacher": preset.teacher.kind,
        "data": _training_data(preset),
        "steps": summary.get("steps", train_cfg.get("max_steps", "?")),
        "batch": train_cfg.get("batch_size", "?"),
        "lr": train_cfg.get("lr", "?"),
        "lm_lr": train_cfg.get("lm_lr") or train_cfg.get("lr", "?"),
        "scores": _score_lines(_scores_found(checkpoint) | (scores or {})),
    }
    return string.Template(CARD_TEMPLATE.read_text()).substitute(values)


# ------------------------------------------------------------------ side by side
def _our_side(model: LlavaLite, tokenizer, tower: VisionTower, template: Template, image, question, max_new_tokens):
    ids = question_prompt(model, template, question)
    pixels = tower.pixels([image])  # [1, 3, S, S]
    input_ids = torch.tensor([ids])
    with torch.no_grad(), evaluating(model):
        feats = tower(pixels)  # [1, P, Dv]
        logits = model(input_ids, image_features=feats).logits[0].float()  # [T, V]
        stop = stop_id(tokenizer)
        new = model.generate(
            input_ids,
            torch.ones_like(input_ids),
            image_features=feats,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop,
            pad_token_id=tokenizer.pad_token_id,
        )[0].tolist()
    return ids, pixels, logits, new


def messages_for(image, question: str) -> list[dict]:
    """One user turn carrying an image and a question, as ``apply_chat_template`` takes it."""
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def compare(
    export_dir: str | Path,
    image: Image.Image | str | Path,
    question: str,
    *,
    checkpoint: str | Path | None = None,
    preset: str | Preset = "tiny",
    model: LlavaLite | None = None,
    tokenizer=None,
    tower: VisionTower | None = None,
    max_new_tokens: int = 16,
) -> dict:
    """Our model and the export on one image and question: the largest logit difference over the
    prompt, both greedy replies (token ids and text), whether the prompts' token ids and the
    pixels agree. Ours comes from ``checkpoint`` (LoRA unmerged) or from ``model``/``tokenizer``."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    image = image if isinstance(image, Image.Image) else load_image(image)
    tower = tower or load_vision(preset.vision)
    if model is None:
        if checkpoint is None:
            raise ValueError("compare needs our side: a checkpoint, or a model and its tokenizer")
        model, tokenizer = load_stage(preset, Path(checkpoint), tower)
    template = get_template(preset.model.stage2_template, tokenizer)
    ids, pixels, ours, new = _our_side(model, tokenizer, tower, template, image, question, max_new_tokens)

    with hub.quiet_loading():
        hf = LlavaForConditionalGeneration.from_pretrained(export_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(export_dir)
    inputs = processor.apply_chat_template(
        messages_for(image, question), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    hf_ids = inputs["input_ids"][0].tolist()
    with torch.no_grad():
        theirs = hf(**inputs).logits[0].float()  # [T, V]
        out = hf.generate(**inputs, max_new_tokens=max_new_tokens)[0, len(hf_ids) :].tolist()
    same_prompt = hf_ids == ids
    stop = stop_id(tokenizer)

    def text(tokens):
        return tokenizer.decode(tokens[: tokens.index(stop)] if stop in tokens else tokens, skip_special_tokens=True)

    return {
        "prompt_ids_equal": same_prompt,
        "prompt_length": len(ids),
        "max_abs_pixel_diff": float((inputs["pixel_values"].float() - pixels).abs().max()),
        "max_abs_logit_diff": float((ours - theirs).abs().max()) if same_prompt else float("inf"),
        "ours_tokens": new,
        "export_tokens": out,
        "ours_text": text(new),
        "export_text": text(out),
    }


def files(folder: str | Path) -> list[dict]:
    """The export's files: name, size in KiB and what each holds (empty for a file we did not write)."""
    return [
        {"file": p.name, "KiB": round(p.stat().st_size / 1024, 1), "holds": FILES.get(p.name, "")}
        for p in sorted(Path(folder).iterdir())
        if p.is_file()
    ]


# ------------------------------------------------------------------ served
def serve_command() -> str | None:
    """The ``transformers`` command beside this Python (or on PATH); None when it is not installed."""
    exe = Path(sys.executable).with_name("transformers")
    return str(exe) if exe.exists() else shutil.which("transformers")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(
    folder: str | Path,
    port: int | None = None,
    *,
    log_path: str | Path | None = None,
    device: str = "cpu",
    env: dict | None = None,
    timeout_s: float = 120,
) -> Iterator[str]:
    """``transformers serve folder`` on 127.0.0.1 (a free port unless ``port``), offline; yields the
    OpenAI-style base URL (``http://127.0.0.1:PORT/v1``) once ``/health`` answers, and stops the
    server when the block ends. Its output goes to ``log_path`` (default: a temporary file), whose
    tail is in the error when the server exits or does not come up in ``timeout_s``."""
    exe = serve_command()
    if exe is None:
        raise FileNotFoundError("the `transformers` command is missing: pip install 'transformers[serving]'")
    port = port or free_port()
    log_path = Path(log_path) if log_path else Path(tempfile.mkdtemp(prefix="llava-lite-serve-")) / "serve.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **(env or {}))
    cmd = [exe, "serve", str(folder), "--host", "127.0.0.1", "--port", str(port), "--device", device]
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd + ["--log-level", "info"], stdout=logf, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited ({proc.returncode}): {log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"transformers serve not up in {timeout_s} s: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:  # not listening yet
                time.sleep(0.2)
        log.info("serving %s at http://127.0.0.1:%d/v1 (log: %s)", folder, port, log_path)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def data_url(image: Image.Image | str | Path) -> str:
    """A picture as a base64 PNG ``data:`` URL, the way an OpenAI-style request carries an image."""
    image = image if isinstance(image, Image.Image) else load_image(image)
    buf = stdio.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_messages(image: Image.Image | str | Path, question: str) -> list[dict]:
    """One user turn of an OpenAI-style chat request: the picture as an ``image_url``, then the question."""
    content = [{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def ask_served(
    base_url: str,
    model: str,
    image: Image.Image | str | Path,
    question: str,
    max_tokens: int = 32,
    temperature: float = 0.0,
    timeout_s: float = 120,
) -> Completion:
    """Ask an OpenAI-compatible server (``transformers serve``, vLLM, ...) about a picture, with the
    chat teacher's endpoint client: ``POST {base_url}/chat/completions``. ``model``: the name the
    server knows (for ``transformers serve``, the export's folder). No API key is sent."""
    with ChatEndpoint(
        base_url, model, "", timeout_s=timeout_s, max_retries=0, temperature=temperature, max_tokens=max_tokens
    ) as endpoint:
        return endpoint.complete(image_messages(image, question))
