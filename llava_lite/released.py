"""LLaVA's released training data, read so a preset can train on it instead of generated data.

Two layouts, each a JSON list of LLaVA samples with the image folder beside it:

    LLaVA-Pretrain/blip_laion_cc_sbu_558k.json   stage 1: one caption turn a sample
    LLaVA-Pretrain/images/00453/004539375.jpg      ("image": "00453/004539375.jpg")
    LLaVA-Instruct-150K/llava_instruct_150k.json   stage 2 (or conversation_58k.json, detail_23k.json,
    coco/train2017/000000033471.jpg                complex_reasoning_77k.json): "image": "000000033471.jpg"

The instruction files key samples by their COCO image, so one id stands for up to three samples
(one of each type); :func:`read_released` gives each a unique id (``<id>-<n>``) and a ``type``.
:func:`import_split` writes them into a preset's layout (instruction JSON, an image list for the
feature cache, the image folder linked in place), after which ``llava-lite features`` and
``llava-lite train`` run on them unchanged.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

from . import io, validate
from .paths import Layout

log = logging.getLogger(__name__)

# a file named for one response type holds only that type; any other file's type is not stated
TYPE_BY_FILE = {"conversation_58k": "conversation", "detail_23k": "detail", "complex_reasoning_77k": "complex"}


def read_released(path: str | Path, stage: int) -> list[dict]:
    """The samples of a released file, checked by the validator, each with a unique ``id`` and a
    ``type``: ``caption`` for stage 1, the file's type or ``instruct`` (not stated) for stage 2."""
    path = Path(path)
    report = validate.validate_file(path)
    if not report.ok:
        raise ValueError(f"{report.summary()}; first: {report.problems[0]}")
    samples = io.read_json(path)
    kind = "caption" if stage == 1 else TYPE_BY_FILE.get(path.stem, "instruct")
    seen: Counter = Counter()
    out = []
    for s in samples:
        seen[str(s["id"])] += 1
        out.append({**s, "id": f"{s['id']}-{seen[str(s['id'])]}", "type": s.get("type", kind)})
    return out


def import_split(
    json_path: str | Path, images: str | Path, layout: Layout, split: str = "train", stage: int = 2
) -> dict[str, int]:
    """Write a released file into ``layout`` as ``split``: ``instruct/<split>.json``, an image list
    (``annotations/instances_<split>.json``, what the feature cache reads) and ``world/<split>``
    linked to ``images``. Text-only samples (no image) are kept out: LLaVA-Lite's stages always
    have one image. Returns the counts."""
    images = Path(images).resolve()
    if not images.is_dir():
        raise FileNotFoundError(f"{images}: no such image folder (the released images beside {json_path})")
    samples = read_released(json_path, stage)
    with_image = [s for s in samples if s.get("image")]
    missing = [s["image"] for s in with_image if not (images / s["image"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{images}: {len(missing)} images of {json_path} are missing, e.g. {missing[:3]}")
    names = sorted({s["image"] for s in with_image})
    records = [{"id": i + 1, "file_name": n} for i, n in enumerate(names)]
    io.write_json(layout.instances(split), {"images": records, "annotations": [], "categories": []})
    io.write_json(layout.instruct / f"{split}.json", with_image)
    link = layout.images(split)
    if link.is_symlink() or not link.exists():
        if link.is_symlink():
            link.unlink()
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(images, link, target_is_directory=True)
    elif link.resolve() != images:
        raise FileExistsError(f"{link} already holds another split's images; remove it or import under another name")
    counts = {"samples": len(with_image), "images": len(names), "text_only_left_out": len(samples) - len(with_image)}
    log.info("%s -> %s (%s)", json_path, layout.instruct / f"{split}.json", counts)
    return counts
