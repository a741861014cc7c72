"""The vision tower: a frozen open_clip ViT that turns images into patch tokens.

LLaVA does not use CLIP's pooled image embedding. It takes the hidden states of one transformer
layer, by default the **penultimate** one (the input to the last block, before the final layer
norm), drops the CLS token and keeps one token per image patch. :class:`VisionTower` does that
for any open_clip ViT:

- a built-in name with a pretrained tag, the real path: ``VisionTower.load("ViT-L-14", "openai")``;
- a local directory holding ``open_clip_config.json`` + weights, such as our tiny CLIP:
  ``VisionTower.load("data/pretrained/tiny-clip")`` (or the short name ``"tiny-clip"``);
- a model config built offline with random weights: ``VisionTower.from_config(cfg, seed=0)``.

The tower owns its preprocessing: any size, aspect ratio or mode (grayscale, RGBA, palette,
16-bit, CMYK) becomes an RGB square padded with the mean colour (LLaVA-1.5's choice, so nothing at
an edge is cropped away), resized to the encoder's input size and normalised. A photo is turned
upright by its EXIF orientation as it is read. A file that cannot be read raises
:class:`ImageReadError` naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn

from . import hub
from .paths import PRETRAINED_DIR

log = logging.getLogger(__name__)

# short names for encoders that ship with the project under data/pretrained/
SHIPPED = {"tiny-clip": PRETRAINED_DIR / "tiny-clip"}


class ImageReadError(ValueError):
    """An image file that PIL cannot decode (missing, not an image, truncated)."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image, upright by its EXIF orientation (as a camera meant it);
    any failure names the file."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later in a batch
            return _upright(img, path)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: image file not found") from None
    except Image.DecompressionBombError as e:  # not an OSError: PIL refuses images this large outright
        raise ImageReadError(
            f"{path}: refused as a possible decompression bomb ({e}); raise PIL.Image.MAX_IMAGE_PIXELS "
            "if the file is trusted"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


def _upright(img: Image.Image, path: Path) -> Image.Image:
    """A copy of ``img`` rotated/flipped as its EXIF orientation says; unrotated (with a warning)
    when the EXIF block itself is damaged, since the pixels are still good."""
    try:
        return ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError) as e:
        log.warning("%s: unreadable EXIF orientation, image kept as stored (%s: %s)", path, type(e).__name__, e)
        return img.copy()


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode as 8-bit RGB; transparent pixels are laid over ``background``.

    16-bit grayscale (``I;16``, or ``I`` as older Pillow reads a 16-bit PNG) keeps its brightness:
    0..65535 maps to 0..255 (value / 257, rounded), so a dark photo stays dark. Float images have
    no fixed range and are stretched from their minimum to their maximum. CMYK uses Pillow's
    conversion, R = (255 - C)(255 - K) / 255 and likewise for G and B."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grayscale -> 8-bit
        a = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.rint(a / 257), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "P") or "transparency" in img.info:  # palette or colour-key alpha too
        img = img.convert("RGBA")
        base = Image.new("RGBA", img.size, background + (255,))
        return Image.alpha_composite(base, img).convert("RGB")
    return img.convert("RGB")


def pad_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre ``img`` on a square canvas of its longer side (LLaVA-1.5's ``expand2square``)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def to_uint8(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a ``[3, H, W]`` uint8 tensor."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # [H, W, 3] -> [3, H, W]


def normalise(
    images_u8: torch.Tensor, mean: torch.Tensor | Sequence[float], std: torch.Tensor | Sequence[float]
) -> torch.Tensor:
    """uint8 pixels ``[..., 3, H, W]`` -> floats in 0..1, less the encoder's mean, over its std:
    the one route from pixels to what a CLIP image encoder reads."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images_u8.device).view(3, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=images_u8.device).view(3, 1, 1)
    return (images_u8.float() / 255 - mean) / std


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def _weights_file(folder: Path) -> Path:
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: no open_clip weights (expected open_clip_model.safetensors)")


def _named_model(name: str, pretrained: str | None, device):
    """An open_clip built-in model with its pretrained weights, from the Hugging Face cache when they
    are there (offline too), downloaded otherwise; a clear error when neither can be done."""
    pcfg = open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}
    repo = pcfg.get("hf_hub", "").strip("/")
    cached = hub.cached_file(repo, hub.OPEN_CLIP_FILES[1:]) if repo else None
    if repo and cached is None and hub.offline():
        raise hub.unavailable("vision tower", f"{name} ({pretrained}: {repo})", LookupError("not cached"))
    weights = str(cached) if cached else pretrained
    quick_gelu = bool(pcfg.get("quick_gelu", False))
    try:
        model, _, _ = open_clip.create_model_and_transforms(
            name, pretrained=weights, device=device, cache_dir=str(hub.cache_dir()), force_quick_gelu=quick_gelu
        )
    except (FileNotFoundError, OSError, RuntimeError) as e:
        if not repo:
            raise
        raise hub.unavailable("vision tower", f"{name} ({pretrained}: {repo})", e) from e
    return model


class VisionTower(nn.Module):
    """Frozen open_clip ViT returning the patch tokens of one layer: ``[B, num_patches, width]``.

    ``layer`` counts transformer blocks the Python way: ``-2`` (default) is the output of the
    second-to-last block, i.e. the input of the last one; ``-1`` is the last block's output
    (still before ``ln_post``). ``keep_cls=True`` keeps the CLS token in front.
    """

    def __init__(
        self,
        visual: nn.Module,
        *,
        name: str,
        weights_id: str,
        layer: int = -2,
        keep_cls: bool = False,
        mean: Sequence[float],
        std: Sequence[float],
    ):
        super().__init__()
        if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "transformer"):
            raise ValueError(f"{name}: only open_clip ViT towers are supported (found {type(visual).__name__})")
        self.visual = visual.eval().requires_grad_(False)
        self.num_blocks = len(visual.transformer.resblocks)
        if not -self.num_blocks <= layer < self.num_blocks:
            raise ValueError(f"{name}: layer {layer} out of range for {self.num_blocks} blocks")
        self.layer = layer
        self.block_index = layer % self.num_blocks  # absolute index of the block whose output we take
        self.keep_cls = keep_cls
        self.name = name
        self.weights_id = weights_id
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        patch = visual.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.grid = self.image_size // self.patch_size
        self.width = int(visual.transformer.width)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.fill = tuple(int(round(m * 255)) for m in mean)

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(
        cls,
        name: str,
        pretrained: str | None = None,
        *,
        layer: int = -2,
        keep_cls: bool = False,
        device: str | torch.device = "cpu",
    ) -> VisionTower:
        """An open_clip model by name + pretrained tag, ``hf-hub:<repo>``, or a local folder
        (``open_clip_config.json`` + weights, the layout the hub uses)."""
        if name.startswith("hf-hub:"):
            name = str(hub.snapshot(name.removeprefix("hf-hub:"), hub.OPEN_CLIP_FILES, what="vision tower"))
        folder = SHIPPED.get(name, Path(name))
        if name in SHIPPED and not folder.is_dir():
            raise FileNotFoundError(f"{folder}: the shipped {name} is missing (retrain it: llava-lite backbones clip)")
        if folder.is_dir():
            folder = folder.resolve()
            model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}", device=device)
            weights_id = _file_hash(_weights_file(folder))
            label = name if name in SHIPPED else folder.name
        else:
            model = _named_model(name, pretrained, device)
            weights_id = pretrained or "random-init"
            label = name
        pp = open_clip.get_model_preprocess_cfg(model)
        return cls(
            model.visual,
            name=label,
            weights_id=weights_id,
            layer=layer,
            keep_cls=keep_cls,
            mean=pp["mean"],
            std=pp["std"],
        ).to(device)

    @classmethod
    def from_config(
        cls, model_cfg: dict, *, seed: int = 0, layer: int = -2, keep_cls: bool = False, name: str = "config"
    ) -> VisionTower:
        """A tower with random weights from an open_clip ``model_cfg`` dict (offline tests, exercises)."""
        torch.manual_seed(seed)
        visual = open_clip.CLIP(**model_cfg).visual
        digest = hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:8]
        return cls(
            visual,
            name=name,
            weights_id=f"random-{digest}-seed{seed}",
            layer=layer,
            keep_cls=keep_cls,
            mean=OPENAI_DATASET_MEAN,
            std=OPENAI_DATASET_STD,
        )

    # ------------------------------------------------------------------ identity
    @property
    def num_patches(self) -> int:
        """Tokens per image that :meth:`forward` returns (patches, plus CLS if kept)."""
        return self.grid * self.grid + int(self.keep_cls)

    @property
    def cache_key(self) -> str:
        """Names encoder, weights, layer and CLS choice: two towers share a key only if they agree."""
        cls_part = "cls" if self.keep_cls else "nocls"
        return f"{_slug(self.name)}__{_slug(self.weights_id)}__layer{self.layer}__{cls_part}"

    # ------------------------------------------------------------------ preprocessing
    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """One PIL image of any size or mode -> normalised ``[3, S, S]`` float tensor."""
        img = pad_to_square(to_rgb(img, self.fill), self.fill)
        if img.size != (self.image_size, self.image_size):
            img = img.resize((self.image_size, self.image_size), Image.BICUBIC, reducing_gap=3.0)
        return normalise(to_uint8(img), self.mean, self.std)  # [3, S, S]

    def pixels(self, images: Iterable[Image.Image | str | os.PathLike]) -> torch.Tensor:
        """Images or file paths -> a batch ``[B, 3, S, S]`` on the tower's device."""
        xs = [self.preprocess(im if isinstance(im, Image.Image) else load_image(im)) for im in images]
        return torch.stack(xs).to(self.mean.device)

    # ------------------------------------------------------------------ forward
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` pixels -> ``[B, num_patches, width]`` hidden states of the chosen layer."""
        out = self.visual.forward_intermediates(
            pixels.to(self.visual.conv1.weight.dtype),
            indices=[self.block_index],
            stop_early=True,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=self.keep_cls,
        )
        tokens = out["image_intermediates"][0]  # [B, grid*grid, width] (CLS already split off)
        if self.keep_cls:
            cls_tok = out["image_intermediates_prefix"][0]  # [B, 1, width]
            tokens = torch.cat([cls_tok, tokens], dim=1)  # [B, 1 + grid*grid, width]
        return tokens

    @torch.no_grad()
    def encode(
        self, images: Sequence[Image.Image | str | os.PathLike] | torch.Tensor, batch_size: int = 250
    ) -> torch.Tensor:
        """Images, paths, or a ``[N, 3, S, S]`` uint8 tensor -> ``[N, num_patches, width]`` features,
        without gradients, ``batch_size`` images at a time."""
        parts = []
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            pixels = (
                normalise(chunk.to(self.mean.device), self.mean, self.std)
                if torch.is_tensor(chunk)
                else self.pixels(chunk)
            )
            parts.append(self(pixels))  # [b, P, D]
        return torch.cat(parts)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, weights={self.weights_id!r}, layer={self.layer}, keep_cls={self.keep_cls}, "
            f"image_size={self.image_size}, patch={self.patch_size}, tokens={self.num_patches}, width={self.width}"
        )
