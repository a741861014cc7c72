"""The shapes world: procedural scenes written as real COCO-format annotations.

A scene holds 1-6 coloured shapes that never touch. It is drawn to a PNG and described twice,
the way COCO describes a photo: ``instances_<split>.json`` (categories such as ``red circle``,
pixel boxes ``[x, y, w, h]``, areas, polygons) and ``captions_<split>.json`` (five captions per
image, each written in a different way). Same seed, same bytes.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from . import coco_download, facts, io
from .config import WorldConfig
from .facts import COLOURS, SHAPES, Obj, article, count_phrase, plural

log = logging.getLogger(__name__)

RGB = {
    "red": (215, 38, 38),
    "orange": (245, 135, 20),
    "yellow": (235, 205, 30),
    "green": (40, 160, 60),
    "blue": (35, 85, 215),
    "purple": (135, 55, 185),
}
SUPERSAMPLE = 4
CATEGORIES = [
    {"id": i + 1, "name": f"{c} {s}", "supercategory": s}
    for i, (s, c) in enumerate((s, c) for s in SHAPES for c in COLOURS)
]
CATEGORY_ID = {c["name"]: c["id"] for c in CATEGORIES}


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    x: int  # left, pixels
    y: int  # top, pixels
    side: int  # width == height, pixels
    tint: tuple[int, int, int]  # the drawn colour (the named colour, slightly jittered)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def area(self) -> float:
        if self.shape == "circle":
            return math.pi * self.side**2 / 4
        if self.shape == "triangle":
            return self.side**2 / 2
        return float(self.side**2)

    def polygon(self) -> list[float]:
        x, y, s = self.x, self.y, self.side
        if self.shape == "square":
            pts = [(x, y), (x + s, y), (x + s, y + s), (x, y + s)]
        elif self.shape == "triangle":
            pts = [(x + s / 2, y), (x + s, y + s), (x, y + s)]
        else:
            r = s / 2
            pts = [
                (x + r + r * math.cos(2 * math.pi * k / 16), y + r + r * math.sin(2 * math.pi * k / 16))
                for k in range(16)
            ]
        return [round(v, 2) for p in pts for v in p]


@dataclass(frozen=True)
class Scene:
    image_id: int
    split: str
    size: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]

    @property
    def file_name(self) -> str:
        return f"{self.image_id:012d}.png"

    def objects(self) -> list[Obj]:
        """The scene as a symbolic context sees it: names and normalised boxes."""
        s = self.size
        return [Obj(sh.name, (sh.x / s, sh.y / s, (sh.x + sh.side) / s, (sh.y + sh.side) / s)) for sh in self.shapes]

    def signature(self) -> tuple:
        return tuple(sorted((sh.name, sh.x, sh.y, sh.side) for sh in self.shapes))


def _tint(colour: str, rng: random.Random) -> tuple[int, int, int]:
    """The drawn colour: the named colour, slightly jittered."""
    return tuple(max(0, min(255, c + rng.randint(-12, 12))) for c in RGB[colour])


def sample_scene(rng: random.Random, image_id: int, split: str, cfg: WorldConfig) -> Scene:
    s = cfg.image_size
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    gap = max(1, round(s / 32))
    shapes: list[Shape] = []
    for _ in range(n):
        for attempt in range(60):
            large = rng.random() < (0.5 if attempt < 30 else 0.0)
            lo, hi = (0.26, 0.34) if large else (0.13, 0.19)
            side = max(3, round(s * rng.uniform(lo, hi)))
            x = rng.randint(gap, s - side - gap)
            y = rng.randint(gap, s - side - gap)
            if all(
                x + side + gap <= o.x or o.x + o.side + gap <= x or y + side + gap <= o.y or o.y + o.side + gap <= y
                for o in shapes
            ):
                colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
                tint = _tint(colour, rng)
                shapes.append(Shape(colour, shape, x, y, side, tint))
                break
    grey = rng.randint(212, 240)
    background = tuple(max(0, min(255, grey + rng.randint(-8, 8))) for _ in range(3))
    return Scene(image_id, split, s, background, tuple(shapes))


def render(scene: Scene) -> Image.Image:
    """Draw a scene (anti-aliased by drawing at 4x and averaging down)."""
    k = SUPERSAMPLE
    img = Image.new("RGB", (scene.size * k, scene.size * k), scene.background)
    draw = ImageDraw.Draw(img)
    for sh in scene.shapes:
        x0, y0, x1, y1 = sh.x * k, sh.y * k, (sh.x + sh.side) * k - 1, (sh.y + sh.side) * k - 1
        if sh.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=sh.tint)
        elif sh.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=sh.tint)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=sh.tint)
    return img.reduce(k)


def with_objects(scene: Scene, objs: Sequence[Obj], rng: random.Random) -> Scene:
    """``scene`` redrawn with ``objs`` (one per shape, in the same order): a shape whose name or
    box changed takes the new ones; its tint is kept when its colour is, else drawn afresh.
    This is how a counterfactual scene (one fact changed) becomes an image."""
    if len(objs) != len(scene.shapes):
        raise ValueError(f"scene {scene.image_id}: {len(objs)} objects for {len(scene.shapes)} shapes")
    s, shapes = scene.size, []
    for sh, o in zip(scene.shapes, objs):
        x, y = round(o.box[0] * s), round(o.box[1] * s)
        side = round(max(o.box[2] - o.box[0], o.box[3] - o.box[1]) * s)
        tint = sh.tint if o.colour == sh.colour else _tint(o.colour, rng)
        shapes.append(Shape(o.colour, o.kind, x, y, side, tint))
    return Scene(scene.image_id, scene.split, s, scene.background, tuple(shapes))


# ---------------------------------------------------------------- captions
def _name(o: Obj, rng: random.Random, size: bool | None = None) -> str:
    """``red circle``, sometimes with its size (``small red circle``)."""
    if size is None:
        size = rng.random() < 0.35
    if not size:
        return o.name
    word = rng.choice({"small": ("small", "little", "tiny"), "large": ("large", "big")}[o.size])
    return f"{word} {o.name}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _background(rng: random.Random) -> str:
    return rng.choice(["a grey background", "a light background", "a plain background", "a pale grey backdrop"])


def _cap_enumerate(objs, rng):
    names = [article(_name(o, rng)) for o in rng.sample(objs, len(objs))]
    lead = rng.choice(["", "An image of ", "A picture with ", "A drawing of ", "This shows ", "There is "])
    text = _join(names)
    if lead == "There is " and len(objs) > 1:
        lead = "There are "
    return lead + text + rng.choice(["", f" on {_background(rng)}"])


def _cap_count(objs, rng):
    if len(objs) == 1:
        return rng.choice(["A single shape: ", "Just one shape, ", "Only one object: "]) + article(objs[0].name)
    kinds: dict[str, int] = {}
    for o in objs:
        kinds[o.kind] = kinds.get(o.kind, 0) + 1
    parts = [count_phrase(c, k) for k, c in sorted(kinds.items(), key=lambda kv: -kv[1])]
    total = count_phrase(len(objs), rng.choice(["shape", "object"]))
    return rng.choice(
        [
            f"{total.capitalize()}: {_join(parts)}",
            f"{_join(parts).capitalize()} on {_background(rng)}",
            f"A picture of {total}",
        ]
    )


def _cap_relation(objs, rng):
    pairs = [(a, b, facts.relation(a, b)) for a in objs for b in objs if a is not b]
    pairs = [p for p in pairs if p[2]] + [
        (a, b, "next to") for a in objs for b in objs if a is not b and facts.next_to(a, b)
    ]
    if not pairs:
        return None
    a, b, rel = rng.choice(pairs)
    verb = rng.choice(["", " sits", " is"])
    return f"{article(_name(a, rng)).capitalize()}{verb} {facts.RELATION_PHRASES[rel]} {article(_name(b, rng))}"


def _cap_location(objs, rng):
    o = max(objs, key=lambda o: o.area) if rng.random() < 0.5 else rng.choice(objs)
    text = f"{article(_name(o, rng)).capitalize()} {facts.region_phrase(o)}"
    if len(objs) > 1:
        text += rng.choice([f" and {count_phrase(len(objs) - 1, 'other shape')}", " with some other shapes", ""])
    return text


def _cap_colours(objs, rng):
    colours = sorted({o.colour for o in objs}, key=COLOURS.index)
    if len(colours) == 1:
        if len(objs) == 1:
            return f"Just one {colours[0]} shape"
        return f"Everything in the picture is {colours[0]}"
    return rng.choice(
        [
            f"{_join(colours).capitalize()} shapes on {_background(rng)}",
            f"Shapes in {_join(colours)}",
            f"Some {_join(colours)} geometric shapes",
        ]
    )


def _cap_superlative(objs, rng):
    if len(objs) < 2:
        return None
    by_area = sorted(objs, key=lambda o: o.area)
    if by_area[-1].area < 1.7 * by_area[-2].area:
        return None
    return f"The {rng.choice(['biggest', 'largest'])} shape is {article(by_area[-1].name)}"


def _cap_kinds(objs, rng):
    kinds = sorted({o.kind for o in objs}, key=SHAPES.index)
    missing = [k for k in SHAPES if k not in kinds]
    if len(kinds) == 1:
        return rng.choice(
            [
                f"Only {plural(kinds[0])}" if len(objs) > 1 else f"A lone {objs[0].name}",
                f"Nothing but {plural(kinds[0]) if len(objs) > 1 else article(kinds[0])} here",
            ]
        )
    text = _join([plural(k) for k in kinds]).capitalize()
    return text + (f", no {plural(missing[0])}" if missing else ", every kind of shape")


def _cap_terse(objs, rng):
    return " and ".join(o.name for o in objs[:3]) + (" and more" if len(objs) > 3 else "")


CAPTIONERS = (
    _cap_enumerate,
    _cap_count,
    _cap_relation,
    _cap_location,
    _cap_colours,
    _cap_superlative,
    _cap_kinds,
    _cap_terse,
)


def finish_caption(captioner, text: str | None) -> str | None:
    """A captioner's text as a caption: a sentence (capital, full stop), except the terse ones."""
    if not text or captioner is _cap_terse:
        return text
    return text[0].upper() + text[1:] + "."


def captions(scene: Scene, rng: random.Random, n: int = 5) -> list[str]:
    """``n`` captions, each by a different captioner, in the varied way people caption photos."""
    objs = scene.objects()
    out: list[str] = []
    for cap in rng.sample(CAPTIONERS, len(CAPTIONERS)):
        text = finish_caption(cap, cap(objs, rng))
        if text and text not in out:
            out.append(text)
        if len(out) == n:
            return out
    raise AssertionError(f"scene {scene.image_id}: only {len(out)} captions")  # every scene has >= 6 captioners


# ---------------------------------------------------------------- the world
def sample_world(cfg: WorldConfig) -> dict[str, list[Scene]]:
    """Every split's scenes (no pixels yet). Splits are disjoint: a layout seen before is redrawn."""
    seen: set[tuple] = set()
    world: dict[str, list[Scene]] = {}
    image_id = 1
    for split, n in cfg.splits.items():
        scenes = []
        for i in range(n):
            for attempt in range(1000):
                scene = sample_scene(random.Random(f"{cfg.seed}:{split}:{i}:{attempt}"), image_id, split, cfg)
                if scene.signature() not in seen:
                    break
            else:
                raise RuntimeError(f"could not draw a new scene for {split} #{i}: the world is too small")
            seen.add(scene.signature())
            scenes.append(scene)
            image_id += 1
        world[split] = scenes
    return world


def coco_files(scenes: list[Scene], cfg: WorldConfig, split: str) -> tuple[dict, dict]:
    """The ``instances`` and ``captions`` documents of one split, as COCO writes them."""
    info = {
        "description": "llava-lite shapes world",
        "version": "1",
        "split": split,
        "seed": cfg.seed,
        "config": asdict(cfg),
    }
    images = [{"id": s.image_id, "file_name": s.file_name, "width": s.size, "height": s.size} for s in scenes]
    anns, caps = [], []
    for s in scenes:
        for sh in s.shapes:
            anns.append(
                {
                    "id": len(anns) + 1 + 10 * s.image_id,
                    "image_id": s.image_id,
                    "category_id": CATEGORY_ID[sh.name],
                    "bbox": [float(sh.x), float(sh.y), float(sh.side), float(sh.side)],
                    "area": round(sh.area, 2),
                    "iscrowd": 0,
                    "segmentation": [sh.polygon()],
                }
            )
        rng = random.Random(f"{cfg.seed}:captions:{s.image_id}")
        for text in captions(s, rng):
            caps.append({"id": len(caps) + 1 + 10 * s.image_id, "image_id": s.image_id, "caption": text})
    instances = {"info": info, "licenses": [], "images": images, "annotations": anns, "categories": CATEGORIES}
    return instances, {"info": info, "licenses": [], "images": images, "annotations": caps}


def _stamp(root: Path, split: str) -> Path:
    return root / "annotations" / f"world_{split}.json"


def generate(cfg: WorldConfig, root: str | Path, progress: bool = True) -> dict[str, int]:
    """Write the world under ``root`` (``annotations/`` and one image folder per split).

    A split whose stamp (``annotations/world_<split>.json``, written after its annotation files)
    matches ``cfg`` is kept as it is, so a stopped run resumes and a finished world costs one small
    read a split, not a redraw of every scene. The annotation files of a split are written after
    all of its images. Returns the number of scenes per split. With ``cfg.source == "coco"`` the
    same layout is filled from COCO 2017 instead (:func:`llava_lite.coco_download.fetch`).
    """
    if cfg.source == "coco":  # the real presets: the same layout, filled from COCO 2017
        return coco_download.fetch(cfg, root, progress=progress)
    if cfg.source != "shapes":
        raise ValueError(f"world source {cfg.source!r}: expected 'shapes' or 'coco'")
    root = Path(root)
    want = asdict(cfg)

    def done(split: str) -> bool:
        stamp = _stamp(root, split)
        return (
            stamp.exists()
            and root.joinpath("annotations", f"instances_{split}.json").exists()
            and root.joinpath("annotations", f"captions_{split}.json").exists()
            and io.read_json(stamp).get("config") == want
        )

    stale = [split for split in cfg.splits if not done(split)]
    if not stale:
        log.info("world is up to date in %s", root)
        return dict(cfg.splits)
    world = sample_world(cfg)  # every split, so image ids and the disjointness check stay the same
    for split in stale:
        scenes = world[split]
        image_dir = root / split
        image_dir.mkdir(parents=True, exist_ok=True)
        for scene in tqdm(scenes, desc=f"world {split}", disable=not progress, unit="scene"):
            with io.atomic_path(image_dir / scene.file_name, durable=False) as tmp:
                render(scene).save(tmp, format="PNG")
        io.flush_all()  # every image on disk before the annotations and the stamp say the split is there
        instances, caps = coco_files(scenes, cfg, split)
        io.write_json(root / "annotations" / f"instances_{split}.json", instances)
        io.write_json(root / "annotations" / f"captions_{split}.json", caps)
        io.write_json(_stamp(root, split), {"config": want, "scenes": len(scenes)})
    return {split: len(scenes) for split, scenes in world.items()}
