"""COCO 2017 for the real presets: its caption and instance annotations and a chosen number of
images, written in the layout every stage already reads (the shapes world's), so contexts, the
teacher, features, training and evaluation read COCO exactly as they read the world::

    <outputs>/coco/annotations_trainval2017.zip           the released annotations, kept for reuse
    <world>/annotations/{instances,captions}_<split>.json  the chosen images' records only
    <world>/<split>/<file_name>                            the chosen images, one file each

``train`` and ``pretrain`` are drawn from train2017, ``test`` and ``val`` from val2017, disjoint
and seeded (a larger ``pretrain`` never changes ``train``, a larger ``val`` never changes ``test``).
A download resumes where it stopped (an HTTP range request on its ``.part`` file), is retried when
the connection drops, and is checked before it is moved into place: its size against the
server's, the annotations by their MD5 and the CRC of every member, an image by decoding it at its
annotated size. Offline, the error says what to fetch by hand and where to put it.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import httpx
from PIL import Image
from tqdm.auto import tqdm

from . import io
from .paths import outputs_root

log = logging.getLogger(__name__)

ANNOTATIONS_ZIP = "annotations/annotations_trainval2017.zip"
# which release split each of our splits is drawn from, in the order they are drawn
SOURCES = {"train2017": ("train", "pretrain"), "val2017": ("test", "val")}


class DownloadError(RuntimeError):
    """A file that could not be fetched or failed its check; the message names the URL and the file."""


class _Refused(DownloadError):
    """The server said no (404, 403, ...): asking again will not help."""


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch_part(client: httpx.Client, url: str, part: Path, progress: bool, desc: str) -> None:
    """Append the rest of ``url`` to ``part`` (a range request when some is there already); raises
    ``httpx.TransportError`` when the connection drops, ``DownloadError`` on a short or refused read."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with client.stream("GET", url, headers=headers) as r:
        if r.status_code == 416:  # the part is as long as the file or longer: start again
            part.unlink()
            raise DownloadError(f"{url}: the partial file {part} does not fit the server's file; starting again")
        if r.status_code not in (200, 206):
            retry = r.status_code == 429 or r.status_code >= 500
            raise (DownloadError if retry else _Refused)(f"{url}: HTTP {r.status_code} (expected 200 or 206)")
        if r.status_code == 200:
            have = 0  # the server ignored the range: take the whole file
        total = have + int(r.headers["content-length"]) if "content-length" in r.headers else None
        with (
            open(part, "ab" if have else "wb") as f,
            tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar,
        ):
            for block in r.iter_raw():  # bytes as they arrive (a buffered chunk would be lost on a drop)
                f.write(block)
                bar.update(len(block))
    got = part.stat().st_size
    if total is not None and got != total:
        raise DownloadError(f"{url}: got {got} of {total} bytes")


def download(
    client: httpx.Client,
    url: str,
    dest: Path,
    md5: str | None = None,
    check=None,
    retries: int = 4,
    backoff_s: float = 0.5,
    progress: bool = True,
) -> Path:
    """``url`` -> ``dest``, resumed across dropped connections, checked (``md5``, and ``check(path)``
    which raises on a bad file) before it is moved into place. A corrupted file is fetched once more
    from scratch; a second bad copy is an error naming the file, what was expected and what came."""
    dest = Path(dest)
    if dest.exists():
        return dest  # only a checked file is ever moved into place
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for fresh_copy in range(2):
        reached = False
        for attempt in range(retries + 1):
            try:
                _fetch_part(client, url, part, progress, dest.name)
                break
            except _Refused:
                raise
            except httpx.ConnectError as e:
                why = e
            except (httpx.TransportError, DownloadError) as e:
                why, reached = e, True
            if attempt < retries:
                log.info("%s: %s; retrying (%d of %d)", url, why, attempt + 1, retries)
                time.sleep(backoff_s * 2**attempt)
        else:
            if not reached:
                raise DownloadError(
                    f"cannot reach {url} ({why}): this machine looks offline. Connect it and run again, or "
                    f"fetch that file by hand and put it at {dest}"
                )
            raise DownloadError(
                f"{url}: the download kept failing after {retries} retries ({why}); run again to resume"
            )
        try:
            found = _md5(part) if md5 else None
            if md5 and found != md5:
                raise DownloadError(f"{url}: checksum mismatch for {dest}: expected MD5 {md5}, found {found}")
            if check:
                check(part)
        except DownloadError as e:
            part.unlink()
            if fresh_copy:
                raise
            log.warning("%s; fetching it again", e)
            continue
        part.replace(dest)
        return dest
    raise AssertionError("unreachable")


def _check_zip(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()  # reads every member and checks its CRC
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{path}: not a zip archive ({e})") from None
    except (zlib.error, EOFError) as e:  # a flipped byte in a compressed member may fail before its CRC
        raise DownloadError(f"{path}: a member fails to decompress ({e}): the archive is corrupted") from None
    if bad:
        raise DownloadError(f"{path}: member {bad} fails its CRC check (the archive is corrupted)")


def fetch_annotations(
    client: httpx.Client, base_url: str, cache: Path, md5: str | None, progress: bool = True, backoff_s: float = 0.5
):
    """The four annotation files of 2017 (captions and instances of train and val), extracted once
    from the released archive into ``cache/annotations/``; returns that folder."""
    folder = cache / "annotations"
    names = [f"{kind}_{src}.json" for kind in ("captions", "instances") for src in SOURCES]
    if all((folder / n).exists() for n in names):
        return folder
    archive = download(
        client,
        f"{base_url}/{ANNOTATIONS_ZIP}",
        cache / Path(ANNOTATIONS_ZIP).name,
        md5,
        _check_zip,
        backoff_s=backoff_s,
        progress=progress,
    )
    with zipfile.ZipFile(archive) as z:
        members = {Path(m).name: m for m in z.namelist()}
        for n in names:
            if n not in members:
                raise DownloadError(f"{archive}: has no annotations/{n}")
            with io.atomic_path(folder / n) as tmp:
                tmp.write_bytes(z.read(members[n]))
    return folder


def choose(image_ids: list[int], splits: dict[str, int], order: tuple[str, ...], seed: int, source: str):
    """Disjoint seeded draws of image ids for the splits of one release split, in ``order``."""
    ids = sorted(image_ids)
    random.Random(f"coco:{source}:{seed}").shuffle(ids)
    need = sum(splits.get(s, 0) for s in order)
    if need > len(ids):
        asked = ", ".join(f"{s}={splits[s]}" for s in order if s in splits)
        raise ValueError(f"COCO {source} has {len(ids)} images; the splits drawn from it ask for {need} ({asked})")
    out, start = {}, 0
    for s in order:
        if s in splits:
            out[s], start = ids[start : start + splits[s]], start + splits[s]
    return out


def subset(doc: dict, ids: list[int]) -> dict:
    """A COCO file with only the images ``ids`` and their annotations (categories all kept)."""
    keep = set(ids)
    return {
        **{k: v for k, v in doc.items() if k not in ("images", "annotations")},
        "images": [im for im in doc["images"] if im["id"] in keep],
        "annotations": [a for a in doc["annotations"] if a["image_id"] in keep],
    }


def _image_check(width: int, height: int):
    def check(path: Path) -> None:
        try:  # decoded in full here (a truncated JPEG fails only when its pixels are read)
            with Image.open(path) as img:
                img.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise DownloadError(f"{path}: cannot decode the image ({type(e).__name__}: {e})") from None
        if img.size != (width, height):
            raise DownloadError(f"{path}: image is {img.size[0]}x{img.size[1]}, its annotation says {width}x{height}")

    return check


def fetch(
    cfg,
    root: str | Path,
    cache: str | Path | None = None,
    progress: bool = True,
    workers: int = 8,
    backoff_s: float = 0.5,
):
    """COCO in the world's layout under ``root`` for the splits of ``cfg`` (a
    :class:`~llava_lite.config.WorldConfig` with ``source="coco"``). A split whose stamp matches
    ``cfg`` is kept as it is; images already there are not fetched again. Returns images per split."""
    root, cache = Path(root), Path(cache) if cache else outputs_root() / "coco"
    unknown = [s for s in cfg.splits if not any(s in order for order in SOURCES.values())]
    if unknown:
        raise ValueError(f"COCO splits are {[s for o in SOURCES.values() for s in o]}; found {unknown}")
    want = asdict(cfg)
    stamps = {s: root / "annotations" / f"world_{s}.json" for s in cfg.splits}
    stale = [s for s, p in stamps.items() if not (p.exists() and io.read_json(p).get("config") == want)]
    if not stale:
        log.info("COCO is up to date in %s", root)
        return dict(cfg.splits)
    base = cfg.coco_url.rstrip("/")
    with httpx.Client(timeout=60, follow_redirects=True) as client:
        ann = fetch_annotations(client, base, cache, cfg.coco_annotations_md5 or None, progress, backoff_s)
        for source, order in SOURCES.items():
            mine = [s for s in order if s in stale]
            if not mine:
                continue
            inst, caps = io.read_json(ann / f"instances_{source}.json"), io.read_json(ann / f"captions_{source}.json")
            drawn = choose([im["id"] for im in inst["images"]], cfg.splits, order, cfg.seed, source)
            for split in mine:
                images = subset(inst, drawn[split])["images"]

                def one(im, split=split, source=source):
                    url, dest = f"{base}/{source}/{im['file_name']}", root / split / im["file_name"]
                    check = _image_check(im["width"], im["height"])
                    return download(client, url, dest, check=check, backoff_s=backoff_s, progress=False)

                with ThreadPoolExecutor(workers) as pool:
                    jobs = pool.map(one, images)
                    for _ in tqdm(jobs, total=len(images), desc=f"COCO {split}", unit="image", disable=not progress):
                        pass
                io.write_json(root / "annotations" / f"instances_{split}.json", subset(inst, drawn[split]))
                io.write_json(root / "annotations" / f"captions_{split}.json", subset(caps, drawn[split]))
                io.write_json(stamps[split], {"config": want, "images": len(images)})
                log.info("COCO %s: %d images from %s in %s", split, len(images), source, root / split)
    return dict(cfg.splits)
