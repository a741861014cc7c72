"""Read a COCO captions + instances pair into symbolic contexts, the text a teacher sees.

Works on the shapes world's files and on real COCO 2014/2017 alike. A context reads::

    A red circle to the left of a blue square.
    ... (every caption, one a line)

    red circle: [0.125, 0.250, 0.406, 0.531]
    blue square: [0.594, 0.281, 0.844, 0.531]

with boxes ``[x1, y1, x2, y2]`` normalised to 0..1 and written with 3 decimals. A malformed
file raises :class:`CocoFormatError` naming the file and the record; nothing is dropped but
crowd regions (``iscrowd: 1``): one box over many people is not one object, and a teacher that
counted it as one would state a wrong count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import io
from .facts import Obj

# boxes may overhang the image by this many pixels (float rounding in real COCO); more is an error
BOX_TOLERANCE_PX = 1.0


class CocoFormatError(ValueError):
    """A COCO file that does not say what it should; the message names the file and the record."""


@dataclass
class SymbolicContext:
    image_id: int
    file_name: str
    width: int
    height: int
    captions: list[str]
    objects: list[Obj] = field(default_factory=list)
    crowds: int = 0  # crowd regions of the image, left out of ``objects``

    def text(self) -> str:
        """The context in LLaVA's form: captions, a blank line, one ``name: [box]`` line per object."""
        lines = list(self.captions)
        if self.objects:
            lines.append("")
            lines += [f"{o.name}: [{', '.join(f'{v:.3f}' for v in o.box)}]" for o in self.objects]
        return "\n".join(lines)


def _need(record: dict, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(record, dict):
        raise CocoFormatError(f"{where}: expected an object, found {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise CocoFormatError(f"{where}: missing key {', '.join(map(repr, missing))} (has {sorted(record)})")


def _records(doc: dict, key: str, path: Path) -> list:
    if not isinstance(doc, dict) or key not in doc:
        raise CocoFormatError(f"{path}: missing top-level key {key!r}")
    if not isinstance(doc[key], list):
        raise CocoFormatError(f"{path}: {key!r} should be a list, found {type(doc[key]).__name__}")
    return doc[key]


def _where(path: Path, key: str, i: int, rec) -> str:
    rid = rec.get("id") if isinstance(rec, dict) else None
    return f"{path}: {key}[{i}]" + (f" (id {rid})" if rid is not None else "")


def load_contexts(instances: str | Path, captions: str | Path) -> list[SymbolicContext]:
    """Symbolic contexts for every image of a COCO split, in image-id order."""
    inst_path, cap_path = Path(instances), Path(captions)
    inst, caps = io.read_json(inst_path), io.read_json(cap_path)

    images: dict[int, SymbolicContext] = {}
    for i, rec in enumerate(_records(inst, "images", inst_path)):
        where = _where(inst_path, "images", i, rec)
        _need(rec, ("id", "file_name", "width", "height"), where)
        if rec["id"] in images:
            raise CocoFormatError(f"{where}: duplicate image id {rec['id']}")
        images[rec["id"]] = SymbolicContext(rec["id"], rec["file_name"], rec["width"], rec["height"], [])

    categories: dict[int, str] = {}
    for i, rec in enumerate(_records(inst, "categories", inst_path)):
        _need(rec, ("id", "name"), _where(inst_path, "categories", i, rec))
        categories[rec["id"]] = rec["name"]

    for i, rec in enumerate(_records(caps, "annotations", cap_path)):
        where = _where(cap_path, "annotations", i, rec)
        _need(rec, ("image_id", "caption"), where)
        if rec["image_id"] not in images:
            raise CocoFormatError(f"{where}: caption for unknown image id {rec['image_id']} (not in {inst_path})")
        images[rec["image_id"]].captions.append(" ".join(str(rec["caption"]).split()))

    for i, rec in enumerate(_records(inst, "annotations", inst_path)):
        where = _where(inst_path, "annotations", i, rec)
        _need(rec, ("image_id", "category_id", "bbox"), where)
        ctx = images.get(rec["image_id"])
        if ctx is None:
            raise CocoFormatError(f"{where}: annotation for unknown image id {rec['image_id']}")
        if rec["category_id"] not in categories:
            raise CocoFormatError(f"{where}: unknown category id {rec['category_id']}")
        box = rec["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise CocoFormatError(f"{where}: bbox should be [x, y, w, h] numbers, found {box!r}")
        x, y, w, h = box
        t = BOX_TOLERANCE_PX
        if w < 0 or h < 0 or x < -t or y < -t or x + w > ctx.width + t or y + h > ctx.height + t:
            raise CocoFormatError(f"{where}: bbox {box} lies outside image {ctx.image_id} ({ctx.width}x{ctx.height})")
        W, H = ctx.width, ctx.height
        norm = (max(0.0, x / W), max(0.0, y / H), min(1.0, (x + w) / W), min(1.0, (y + h) / H))
        if rec.get("iscrowd", 0) == 1:
            ctx.crowds += 1
            continue
        ctx.objects.append(Obj(categories[rec["category_id"]], norm))

    empty = [c for c in images.values() if not c.captions]
    if empty:
        ids = ", ".join(str(c.image_id) for c in empty[:5]) + (" ..." if len(empty) > 5 else "")
        raise CocoFormatError(f"{cap_path}: {len(empty)} image(s) of {inst_path} have no captions: ids {ids}")
    return [images[k] for k in sorted(images)]
