"""The feature cache: a frozen vision tower's patch tokens for every image of a split, on disk.

Both LLaVA stages keep CLIP frozen, so its output for an image never changes: computing it once
and reading it back makes a training step much cheaper than running the tower on pixels.

Layout (one folder per tower, keyed by :attr:`VisionTower.cache_key`, so two layers or two
encoders never mix)::

    <features>/<cache_key>/<split>/shard-00000.safetensors   "features" [n, P, D] fp16, "image_ids" [n]
    <features>/<cache_key>/<split>/index.json                image id -> (shard, row), file names

Every file is written atomically. A shard is planned from the sorted image ids, so a stopped
run finds the shards it finished (their ids are in each shard's metadata) and computes only the
rest. A corrupt image raises an error naming the file, before its shard is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import io
from .vision import VisionTower

log = logging.getLogger(__name__)

FORMAT = "llava-lite-features/1"


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    file_name: str


def split_images(instances_json: str | Path) -> list[ImageRecord]:
    """The images a COCO instances file lists, sorted by id."""
    path = Path(instances_json)
    doc = io.read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise ValueError(f"{path}: expected a COCO file with an 'images' list")
    out = []
    for i, rec in enumerate(doc["images"]):
        if not isinstance(rec, dict) or "id" not in rec or "file_name" not in rec:
            raise ValueError(f"{path}: images[{i}] needs 'id' and 'file_name', found {rec!r:.120}")
        out.append(ImageRecord(int(rec["id"]), str(rec["file_name"])))
    return sorted(out, key=lambda r: r.image_id)


def cache_folder(root: str | Path, tower: VisionTower, split: str) -> Path:
    """Where ``tower``'s features of ``split`` live under a features root."""
    return Path(root) / tower.cache_key / split


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _images_digest(image_dir: Path, recs: Sequence[ImageRecord]) -> str:
    """A fingerprint of a shard's image files' bytes: a redrawn world (same ids, other pictures)
    never reuses old features."""
    h = hashlib.sha1()
    for r in recs:
        path = image_dir / r.file_name
        h.update(r.file_name.encode())
        h.update(path.read_bytes() if path.is_file() else b"<missing>")
    return h.hexdigest()


def _files_stat(image_dir: Path, recs: Sequence[ImageRecord]) -> str:
    """A fingerprint of a shard's image files' names, sizes and modification times: when it
    matches the one a finished shard recorded, its files are the ones it was computed from and
    their bytes need not be read again (a later call costs a ``stat`` per image, not a read)."""
    h = hashlib.sha1()
    for r in recs:
        path = image_dir / r.file_name
        st = path.stat() if path.is_file() else None
        h.update(f"{r.file_name}\t{st.st_size if st else -1}\t{st.st_mtime_ns if st else -1}\n".encode())
    return h.hexdigest()


def _shard_meta(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # a damaged shard is recomputed, not trusted
        log.warning("%s: unreadable shard (%s); recomputing it", path, e)
        return None


def _shard_done(path: Path, cache_key: str, ids: list[int], image_dir: Path, recs: Sequence[ImageRecord]) -> bool:
    """A shard on disk counts as finished only if it holds exactly the planned ids of this tower,
    computed from these very image files (the same stat, or else the same bytes)."""
    meta = _shard_meta(path)
    if meta is None or meta.get("cache_key") != cache_key or json.loads(meta.get("image_ids", "[]")) != ids:
        return False
    if meta.get("images_stat") == _files_stat(image_dir, recs):
        return True
    return meta.get("images_sha1") == _images_digest(image_dir, recs)


@torch.no_grad()
def extract(
    tower: VisionTower,
    instances_json: str | Path,
    image_dir: str | Path,
    out_dir: str | Path,
    batch_size: int = 64,
    shard_size: int = 512,
    progress: bool = True,
) -> Path:
    """Run ``tower`` over every image of a split and write fp16 shards + ``index.json`` to ``out_dir``.

    Finished shards are kept (resume); returns ``out_dir``.
    """
    records = split_images(instances_json)
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    io.remove_stale_temps_in(out_dir)  # a killed run's half-written shard
    shards = [records[i : i + shard_size] for i in range(0, len(records), shard_size)]
    todo = [
        k
        for k, recs in enumerate(shards)
        if not _shard_done(out_dir / _shard_name(k), tower.cache_key, [r.image_id for r in recs], image_dir, recs)
    ]
    if len(todo) < len(shards):
        log.info("%s: %d of %d shards already done", out_dir, len(shards) - len(todo), len(shards))
    tower.eval()
    bar = tqdm(
        total=sum(len(shards[k]) for k in todo), desc=f"features {out_dir.name}", unit="img", disable=not progress
    )
    for k in todo:
        recs = shards[k]
        parts = []
        for i in range(0, len(recs), batch_size):
            chunk = recs[i : i + batch_size]
            parts.append(
                tower.encode([image_dir / r.file_name for r in chunk], batch_size).to(torch.float16).cpu()
            )  # [b, P, D]
            bar.update(len(chunk))
        feats = torch.cat(parts)  # [n, P, D]
        ids = [r.image_id for r in recs]
        digest, stat = _images_digest(image_dir, recs), _files_stat(image_dir, recs)
        meta = {"format": FORMAT, "cache_key": tower.cache_key, "image_ids": json.dumps(ids),
                "images_sha1": digest, "images_stat": stat}  # fmt: skip
        with io.atomic_path(out_dir / _shard_name(k)) as tmp:
            save_file({"features": feats, "image_ids": torch.tensor(ids, dtype=torch.int64)}, str(tmp), metadata=meta)
    bar.close()
    index = {
        "format": FORMAT,
        "cache_key": tower.cache_key,
        "instances": str(instances_json),
        "tokens": tower.num_patches,
        "width": tower.width,
        "dtype": "float16",
        "num_images": len(records),
        "shards": [
            {"file": _shard_name(k), "image_ids": [r.image_id for r in recs], "file_names": [r.file_name for r in recs]}
            for k, recs in enumerate(shards)
        ],
    }
    if todo or not (out_dir / "index.json").is_file() or io.read_json(out_dir / "index.json") != index:
        io.write_json(out_dir / "index.json", index)
    return out_dir


class FeatureReader:
    """Cached features by image id (or file name): ``reader[image_id] -> [P, D]`` fp16.

    Shards are loaded on first use and kept in memory (the tiny preset's train split is ~130 MB).
    Calling the reader, ``reader(name_or_id)``, is what the data collator expects.
    """

    def __init__(self, folder: str | Path, expect_key: str | None = None):
        self.folder = Path(folder)
        index_path = self.folder / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.folder}: no index.json (run `llava-lite features` for this split first)")
        self.index = io.read_json(index_path)
        if expect_key is not None and self.index["cache_key"] != expect_key:
            raise ValueError(f"{index_path}: features of {self.index['cache_key']!r}, expected {expect_key!r}")
        self.where: dict[int, tuple[int, int]] = {}
        self.by_name: dict[str, int] = {}
        for s, shard in enumerate(self.index["shards"]):
            for row, (iid, name) in enumerate(zip(shard["image_ids"], shard["file_names"])):
                self.where[iid] = (s, row)
                self.by_name[name] = iid
        self._loaded: dict[int, torch.Tensor] = {}

    @property
    def cache_key(self) -> str:
        return self.index["cache_key"]

    @property
    def tokens(self) -> int:
        return self.index["tokens"]

    @property
    def width(self) -> int:
        return self.index["width"]

    @property
    def image_ids(self) -> list[int]:
        return list(self.where)

    def __len__(self) -> int:
        return len(self.where)

    def __contains__(self, image_id: int) -> bool:
        return image_id in self.where

    def _shard(self, s: int) -> torch.Tensor:
        if s not in self._loaded:
            path = self.folder / self.index["shards"][s]["file"]
            self._loaded[s] = load_file(str(path))["features"]  # [n, P, D]
        return self._loaded[s]

    def __getitem__(self, image_id: int) -> torch.Tensor:
        if image_id not in self.where:
            raise KeyError(f"{self.folder}: no features for image id {image_id}")
        s, row = self.where[image_id]
        return self._shard(s)[row]  # [P, D]

    def __call__(self, image: int | str) -> torch.Tensor:
        """Features of an image given by id or by file name (as LLaVA JSON names images)."""
        if isinstance(image, str):
            name = image if image in self.by_name else Path(image).name  # LLaVA-Pretrain's "00453/<id>.jpg"
            if name not in self.by_name:
                raise KeyError(f"{self.folder}: no features for image file {image!r}")
            image = self.by_name[name]
        return self[image]

    def get_many(self, image_ids: Sequence[int | str]) -> torch.Tensor:
        """``[B, P, D]`` features for a batch of ids or file names."""
        return torch.stack([self(i) for i in image_ids])
