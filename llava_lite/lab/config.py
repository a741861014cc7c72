"""What decides the tiny backbones, one dataclass per concern.

Each backbone has an architecture, the data it is shown, how it is trained, and where it runs.
The first three are what a run learns from; the runtime (device, threads, how often it reports
and saves) is where and how fast it goes, so a stopped run resumes under other runtime values.
The field names are the command line's flags (``lm_hidden`` is ``--lm-hidden``), and a card's
``metrics.json`` records every field under ``config``. The world a backbone is trained on is a
:class:`~llava_lite.config.WorldConfig` of its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

LM_LAYOUTS = ("sized",)  # the reading layout the tiny LM pretrains on (llava_lite.scene_text)
LR_SCHEDULES = ("cosine", "wsd")


# ------------------------------------------------------------------ the tiny LM
@dataclass
class LMArchitecture:
    """The tiny Llama and its BPE vocabulary."""

    lm_hidden: int = 192
    lm_layers: int = 4
    lm_heads: int = 6
    lm_intermediate: int = 512
    lm_max_positions: int = 1024
    lm_rope_theta: float = 10000.0
    vocab_size: int = 512  # BPE target size


@dataclass
class LMDocuments:
    """The reading documents the tiny LM pretrains on (:mod:`llava_lite.lab.documents`)."""

    layout: str = "sized"  # how a scene is written (llava_lite.scene_text); recorded with the tokenizer
    qa_per_doc: int = 8  # questions per scene
    caption_share: float = 0.05  # documents asking for a caption instead (stage 1's task)
    text_share: float = 0.0  # documents read as plain text (context and questions predicted too)
    text_weight: float = 0.2  # weight of a plain-text document's non-answer tokens
    length_group: int = 4  # batches drawn together and sorted by length (less padding)

    def __post_init__(self):
        if self.layout not in LM_LAYOUTS:
            raise ValueError(
                f"layout {self.layout!r}: the tiny LM pretrains on {LM_LAYOUTS} "
                "(the other layouts' experiments are in the tiny LM's LAB.md)"
            )


@dataclass
class LMTraining:
    """The optimiser, its schedule and the seed (of the weights and of the documents)."""

    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    lr_schedule: str = "cosine"  # after warmup: "cosine" to min_lr, or "wsd" (hold lr, then a cosine
    decay_share: float = 0.3  # to min_lr over this last share of the steps)
    bf16: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {self.lr_schedule!r}: expected one of {LR_SCHEDULES}")


@dataclass
class LMRuntime:
    """Where the run goes and how often it reports; a checkpoint resumes under other values."""

    threads: int = 2
    device: str = "cpu"  # "cuda" trains on a GPU (bf16 autocast there too)
    workers: int = 0  # processes building the documents beside the loop (0: none); a GPU step outruns the building
    eval_every: int = 250
    eval_scenes: int = 150  # val scenes scored at each eval
    checkpoint_every: int = 250


# ------------------------------------------------------------------ the tiny CLIP
@dataclass
class ClipArchitecture:
    """The tiny CLIP in open_clip's architecture (:func:`llava_lite.lab.clip.model_config`)."""

    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 4
    vision_head_width: int = 32
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    context_length: int = 40
    embed_dim: int = 128
    init_temperature: float = 0.07


@dataclass
class ClipTexts:
    """Which text each image is paired with (:mod:`llava_lite.lab.clip_texts`)."""

    describe_prob: float = 0.3  # share of texts naming every object with colour, shape and size
    shape_prob: float = 0.3  # share naming every object by shape and size only (the rest: world captions)
    hard_negatives: bool = True  # each description also scored against its counterfactual
    counterfactual_images: bool = False  # the counterfactual scene drawn too, and put in the batch with its text


@dataclass
class ClipTraining:
    """The optimiser, its schedule, the seed, and the weights to start from."""

    steps: int = 1500
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    bf16: bool = True  # autocast the forward pass to bfloat16
    seed: int = 0
    init: str = ""  # a saved tiny CLIP to start from (same architecture and vocabulary); "" = random weights


@dataclass
class ClipRuntime:
    """Where the run goes and what it measures on the way."""

    threads: int = 0  # CPU threads (0: torch's default)
    device: str = "cpu"  # "cuda": train on a GPU (images are still drawn on the CPU)
    eval_every: int = 250
    eval_scenes: int = 500  # held-out scenes scored while training (retrieval, 1 in 100)
    metric_scenes: int = 1000  # held-out scenes for the final metrics


def flat(*configs) -> dict:
    """The fields of several configs in one dict (their names never clash): a card's ``config``."""
    out: dict = {}
    for cfg in configs:
        out.update(asdict(cfg))
    return out
