"""Small dataclasses, one per concern, and the presets that fill them by name.

A preset only changes names and sizes: every stage runs the same functions in every preset.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import io


@dataclass
class WorldConfig:
    """The procedural shapes world, or (``source="coco"``) which COCO 2017 images, from where."""

    source: str = "shapes"  # "shapes": the procedural world | "coco": COCO 2017, downloaded
    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 6
    seed: int = 0
    # scenes per split; the splits are disjoint (no scene appears in two of them)
    splits: dict[str, int] = field(default_factory=lambda: {"pretrain": 20000, "train": 8000, "val": 500, "test": 500})
    # COCO: the server of the release (images at <url>/<train2017|val2017>/<file>) and the annotations' MD5
    coco_url: str = "http://images.cocodataset.org"
    coco_annotations_md5: str = "f4bbac642086de4f52a3fdda2de5fa2c"  # annotations_trainval2017.zip


@dataclass
class TeacherConfig:
    """Who writes the instruction data: the offline symbolic teacher, a chat endpoint or a local chat model."""

    kind: str = "symbolic"  # "symbolic" | "chat" | "local"
    seed: int = 0
    model: str = ""  # chat model name for kind="chat"; a folder or hub id for kind="local"
    base_url: str = ""  # OpenAI-compatible endpoint for kind="chat"
    api_key_env: str = "OPENAI_API_KEY"  # name of the environment variable, never the key
    # chat teacher: request shape, concurrency and how hard to retry
    chat_temperature: float | None = 0.2  # None: leave it out of the request (some models refuse it)
    chat_max_tokens: int = 1024  # 0: leave it out of the request
    chat_concurrency: int = 4  # requests in flight at once
    chat_timeout_s: float = 120.0  # per request
    chat_max_retries: int = 6  # per request, on 429, 5xx, timeouts and dropped connections
    chat_backoff_s: float = 1.0  # first back-off; doubles each retry (with jitter)
    chat_max_backoff_s: float = 60.0
    chat_format_retries: int = 2  # extra requests for a context whose reply is malformed (none when greedy local)
    # local teacher (kind="local"): prompts answered in batches by a chat model on this machine
    local_batch_size: int = 8
    local_device: str = ""  # "" picks cuda when available (fp16), else cpu (fp32)


@dataclass
class VisionConfig:
    """The frozen vision tower: an open_clip model (name + pretrained tag, or a folder) and its layer."""

    encoder: str = "tiny-clip"  # open_clip name (ViT-L-14), a folder, or a short name of data/pretrained/
    pretrained: str | None = None  # open_clip pretrained tag for a named model (e.g. "openai")
    layer: int = -2  # transformer block whose output is used: -2 penultimate (LLaVA), -1 last
    keep_cls: bool = False


@dataclass
class LanguageConfig:
    """The language model LLaVA starts from: a folder of ``data/pretrained/`` or a hub name."""

    name: str = "tiny-lm"  # short name of data/pretrained/, a folder, or a hub id (HuggingFaceTB/SmolLM2-360M-Instruct)
    dtype: str = "fp32"  # weights' dtype when loaded: fp32 | bf16 | fp16
    attn: str = "sdpa"  # attention kernel: "sdpa" (PyTorch's, runs on a T4) | "eager" | "flash_attention_2" (Ampere+)
    load_in_4bit: bool = False  # QLoRA: a 4-bit (NF4) frozen base under LoRA; needs a CUDA GPU and bitsandbytes


@dataclass
class ModelConfig:
    """How the two are joined, and how samples become tokens."""

    projector_type: str = "mlp2x_gelu"  # "linear" (the paper) | "mlp2x_gelu" (LLaVA-1.5)
    stage1_template: str = "chat"  # "chat": the paper's instruction + caption; "plain": LLaVA-1.5's bare caption
    stage2_template: str = "chat"
    max_len: int = 256  # tokens per sample, image tokens included
    lora: bool = False  # stage 2: LoRA adapters instead of the full language model
    lora_r: int = 16
    lora_alpha: int = 32


@dataclass
class LlavaConfig:
    """What a LLaVA checkpoint was built for (saved beside its weights as ``llava_config.json``)."""

    vision_key: str  # the vision tower's cache_key: encoder, weights, layer, CLS choice
    vision_dim: int
    num_image_tokens: int
    lm_name: str  # hub name or folder of the language model
    lm_dim: int
    projector_type: str = "mlp2x_gelu"
    image_token_id: int = -1
    lm_fingerprint: str = ""  # a digest of the base language model's weights ("" when not known)

    def save(self, folder: Path) -> None:
        io.write_json(Path(folder) / "llava_config.json", asdict(self), indent=2)

    @classmethod
    def load(cls, folder: Path) -> LlavaConfig:
        path = Path(folder) / "llava_config.json"
        if not path.exists():
            raise FileNotFoundError(f"{folder}: not a llava-lite checkpoint (no llava_config.json)")
        return cls(**json.loads(path.read_text()))

    def check_compatible(self, other: LlavaConfig, what: str) -> None:
        """A clear error when a checkpoint (``self``) belongs to another encoder, LM or projector than
        the model it is loaded into (``other``): the checkpoint's value first, then the model's. Two
        language models of the same width are told apart by name, ``<image>`` id and weights."""
        names = (
            "vision_key",
            "vision_dim",
            "num_image_tokens",
            "lm_name",
            "lm_dim",
            "image_token_id",
            "projector_type",
        )
        for name in names + ("lm_fingerprint",):
            a, b = getattr(self, name), getattr(other, name)
            if name == "lm_fingerprint" and not (a and b):
                continue  # written before weights were fingerprinted
            if a != b:
                raise ValueError(f"{what} was made for {name}={a!r}, but this model has {name}={b!r}")


@dataclass
class TrainConfig:
    """One stage of the training loop (:mod:`llava_lite.train`)."""

    stage: int = 1
    lr: float = 1e-3  # projector learning rate
    lm_lr: float | None = None  # language model learning rate (stage 2); None = lr
    batch_size: int = 32  # global batch: samples per optimizer step, over all processes
    grad_accum: int = 1  # micro-batches per optimizer step
    epochs: float = 1.0
    max_steps: int = 0  # 0 = as many as ``epochs`` gives
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    group_by_length: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0
    log_every: int = 10
    # steps between checkpoints (0: only at the end). Measured on the tiny preset: a stage-2
    # checkpoint (0.94M weights + AdamW state) saves in ~0.2 s against ~0.24 s a step, so 250 costs
    # under 0.4% of the run (stage 1: 0.08 s); larger presets have slower steps in proportion
    save_every: int = 250
    keep_checkpoints: int = 2
    # stop after this step with a checkpoint, as Ctrl-C would (0: run to the end); not part of the
    # run's settings, so the same run started again without it resumes there and finishes
    stop_at: int = 0


@dataclass
class ScienceQAConfig:
    """The shapes world's ScienceQA-style multiple-choice set (:mod:`llava_lite.scienceqa`)."""

    seed: int = 0
    questions_per_scene: int = 2  # of different categories (count, colour, shape, position, size)
    hint_share: float = 0.2  # share of questions asked with a text-only hint instead of the picture


@dataclass
class Preset:
    name: str
    world: WorldConfig = field(default_factory=WorldConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # the tiny preset's schedules, sized for minutes on two CPU cores (docs/results.md has how they were chosen)
    stage1: TrainConfig = field(default_factory=lambda: TrainConfig(stage=1, lr=1e-3, batch_size=32, epochs=1))
    stage2: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            stage=2, lr=1e-3, lm_lr=2e-3, batch_size=16, max_steps=2000, group_by_length=True
        )
    )

    def replace(self, **changes) -> Preset:
        return dataclasses.replace(self, **changes)


def _tiny() -> Preset:
    return Preset(name="tiny")


def _colab() -> Preset:
    return Preset(
        name="colab",
        world=WorldConfig(source="coco", splits={"train": 4000, "val": 200, "test": 200}),
        vision=VisionConfig(encoder="ViT-B-16", pretrained="openai"),
        language=LanguageConfig(name="HuggingFaceTB/SmolLM2-360M-Instruct", dtype="fp32"),
        model=ModelConfig(max_len=512, lora=True, lora_r=64, lora_alpha=128),
        # sized for one T4 (16 GB, fp16): micro-batches of 8 with accumulation
        # checkpoints every few minutes, so a notebook rerun after a Colab disconnect resumes (run_stage)
        stage1=TrainConfig(stage=1, lr=1e-3, batch_size=64, grad_accum=8, precision="fp16", save_every=20),
        stage2=TrainConfig(
            stage=2,
            lr=2e-5,
            lm_lr=2e-4,
            batch_size=32,
            grad_accum=8,
            epochs=1,
            precision="fp16",
            group_by_length=True,
            gradient_checkpointing=True,
            save_every=100,
        ),
    )


def _full() -> Preset:
    return Preset(
        name="full",
        world=WorldConfig(source="coco", splits={"train": 100000, "val": 1000, "test": 1000}),
        vision=VisionConfig(encoder="ViT-L-14-336", pretrained="openai"),
        language=LanguageConfig(name="Qwen/Qwen2.5-1.5B-Instruct", dtype="bf16"),
        model=ModelConfig(max_len=2048),
        # sized for one 80 GB A100/H100 (micro-batches of 8); on N GPUs divide grad_accum by N
        stage1=TrainConfig(
            stage=1,
            lr=1e-3,
            batch_size=256,
            grad_accum=32,
            precision="bf16",
            gradient_checkpointing=True,
            save_every=100,
        ),
        stage2=TrainConfig(
            stage=2,
            lr=2e-5,
            batch_size=128,
            grad_accum=16,
            epochs=1,
            precision="bf16",
            group_by_length=True,
            gradient_checkpointing=True,
            save_every=200,
        ),
    )


PRESETS = {"tiny": _tiny, "colab": _colab, "full": _full}


def get_preset(name: str) -> Preset:
    """A fresh copy of the named preset (changing it never changes the defaults)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}") from None
