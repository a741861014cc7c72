"""COCO 2017 fetched from a real HTTP server on 127.0.0.1 serving a small COCO-format release:
resumed after a dropped connection, a corrupted file fetched again, a clear message offline, and
the result read by every stage the way it reads the shapes world."""

import hashlib
import io as stdio
import json
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from PIL import Image

from llava_lite import cli, coco, coco_download, io, world
from llava_lite.config import WorldConfig
from llava_lite.paths import Layout
from llava_lite.teachers import instruct

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 55, "name": "orange"}]


def _release(n_train: int = 10, n_val: int = 8) -> dict[str, bytes]:
    """path -> bytes of a small release: the annotations archive and one JPEG per image."""
    files, docs = {}, {}
    next_id = 1
    for source, n in (("train2017", n_train), ("val2017", n_val)):
        images, anns, caps = [], [], []
        for i in range(n):
            image_id = (1000 if source == "train2017" else 5000) + i
            w, h = 40 + i, 30
            name = f"{image_id:012d}.jpg"
            buf = stdio.BytesIO()
            Image.new("RGB", (w, h), (10 * i, 100, 200)).save(buf, format="JPEG")
            files[f"/{source}/{name}"] = buf.getvalue()
            images.append({"id": image_id, "file_name": name, "width": w, "height": h})
            for k in range(i % 3):  # some images have no instance at all
                anns.append(
                    {"id": next_id, "image_id": image_id, "category_id": CATEGORIES[k]["id"], "bbox": [1, 2, 10, 12]}
                )
                next_id += 1
            caps += [
                {"id": 10 * image_id + c, "image_id": image_id, "caption": f"photo {i} caption {c}"} for c in (0, 1)
            ]
        docs[f"instances_{source}.json"] = {"images": images, "annotations": anns, "categories": CATEGORIES}
        docs[f"captions_{source}.json"] = {"images": images, "annotations": caps}
    buf = stdio.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, doc in docs.items():
            z.writestr(f"annotations/{name}", json.dumps(doc))
    files["/" + coco_download.ANNOTATIONS_ZIP] = buf.getvalue()
    return files


class Release:
    """A threaded HTTP server of a release, with range requests and scripted faults."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.log = files, []
        self.drop_once: set[str] = set()  # send half the body, then close the connection
        self.corrupt: dict[str, int] = {}  # serve flipped bytes this many times
        release = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                release.log.append((self.path, rng))
                body = release.files.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if release.corrupt.get(self.path, 0) > 0:
                    release.corrupt[self.path] -= 1
                    if self.path.endswith(".jpg"):  # a JPEG would still decode with one byte flipped
                        body = bytes(8) + body[8:]
                    else:
                        mid = len(body) // 2
                        body = body[:mid] + bytes([body[mid] ^ 0xFF]) + body[mid + 1 :]
                start = int(rng.split("=")[1].rstrip("-")) if rng else 0
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if self.path in release.drop_once:
                    release.drop_once.discard(self.path)
                    self.wfile.write(body[start : start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def requests(self, path: str) -> list:
        return [r for p, r in self.log if p == path]


@pytest.fixture
def release():
    r = Release(_release())
    yield r
    r.server.shutdown()
    r.server.server_close()


def _cfg(release, **splits) -> WorldConfig:
    md5 = hashlib.md5(release.files["/" + coco_download.ANNOTATIONS_ZIP]).hexdigest()
    return WorldConfig(source="coco", splits=splits, coco_url=release.url, coco_annotations_md5=md5)


ZIP = "/" + coco_download.ANNOTATIONS_ZIP


def test_a_dropped_connection_resumes_from_the_byte_it_stopped_at(release, tmp_path):
    release.drop_once.add(ZIP)
    size = len(release.files[ZIP])
    with httpx.Client() as client:
        got = coco_download.download(client, release.url + ZIP, tmp_path / "a.zip", backoff_s=0, progress=False)
    assert got.read_bytes() == release.files[ZIP]
    assert release.requests(ZIP) == [None, f"bytes={size // 2}-"]
    assert not (tmp_path / "a.zip.part").exists()


def test_a_corrupted_file_is_fetched_again_and_a_persistently_corrupted_one_is_an_error(release, tmp_path):
    md5 = hashlib.md5(release.files[ZIP]).hexdigest()
    release.corrupt[ZIP] = 1
    with httpx.Client() as client:
        got = coco_download.download(client, release.url + ZIP, tmp_path / "a.zip", md5=md5, progress=False)
        assert got.read_bytes() == release.files[ZIP] and len(release.requests(ZIP)) == 2
        # no MD5 given: the zip's own CRCs catch the flipped byte
        release.corrupt[ZIP] = 2
        with pytest.raises(coco_download.DownloadError, match=r"b\.zip.part: .*(CRC check|decompress).*corrupted"):
            coco_download.download(client, release.url + ZIP, tmp_path / "b.zip", check=coco_download._check_zip)
        release.corrupt[ZIP] = 2
        with pytest.raises(coco_download.DownloadError, match=rf"checksum mismatch .*c\.zip: expected MD5 {md5}"):
            coco_download.download(client, release.url + ZIP, tmp_path / "c.zip", md5=md5, progress=False)
    assert not any(tmp_path.glob("[bc].zip*")), "a bad copy is never left in place"


def test_offline_the_error_says_what_to_fetch_and_where(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    cfg = WorldConfig(source="coco", splits={"train": 2}, coco_url=f"http://127.0.0.1:{port}")
    with pytest.raises(coco_download.DownloadError) as e:
        coco_download.fetch(cfg, tmp_path / "world", cache=tmp_path / "cache", progress=False, backoff_s=0)
    msg = str(e.value)
    assert f"cannot reach http://127.0.0.1:{port}/annotations/annotations_trainval2017.zip" in msg
    assert "offline" in msg and str(tmp_path / "cache" / "annotations_trainval2017.zip") in msg


def test_coco_splits_are_disjoint_seeded_and_read_by_every_stage_like_the_world(release, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_LITE_OUTPUTS", str(tmp_path / "out"))
    layout = Layout.for_preset("colab")
    cfg = _cfg(release, train=6, test=3, val=2)
    release.drop_once.add("/train2017/000000001003.jpg")
    release.corrupt["/val2017/000000005001.jpg"] = 1
    assert world.generate(cfg, layout.world, progress=False) == {"train": 6, "test": 3, "val": 2}
    ids = {s: [im["id"] for im in io.read_json(layout.instances(s))["images"]] for s in ("train", "test", "val")}
    assert [len(v) for v in ids.values()] == [6, 3, 2]
    assert all(1000 <= i < 1010 for i in ids["train"]) and all(5000 <= i < 5008 for i in ids["test"] + ids["val"])
    assert not set(ids["test"]) & set(ids["val"])
    for split, got in ids.items():
        names = sorted(p.name for p in layout.images(split).iterdir())
        assert names == sorted(f"{i:012d}.jpg" for i in got)
        assert [a["image_id"] in got for a in io.read_json(layout.instances(split))["annotations"]].count(False) == 0
    # the same seed draws the same images; a larger val leaves test as it was
    again = coco_download.choose(list(range(5000, 5008)), {"test": 3, "val": 4}, ("test", "val"), 0, "val2017")
    assert sorted(again["test"]) == sorted(ids["test"])
    # a finished split costs no request; a rerun asks for nothing
    n = len(release.log)
    world.generate(cfg, layout.world, progress=False)
    assert len(release.log) == n
    # contexts and the teacher read COCO as they read the world (images without instances included)
    contexts = coco.load_contexts(layout.instances("train"), layout.captions("train"))
    assert len(contexts) == 6 and any(not c.objects for c in contexts)
    samples = io.read_json(instruct.build_split(layout, "train"))
    assert {s["image"] for s in samples} == {c.file_name for c in contexts}


def test_asking_for_more_images_than_the_release_has_names_both_numbers(release, tmp_path):
    with pytest.raises(ValueError, match=r"COCO train2017 has 10 images; the splits drawn from it ask for 11"):
        coco_download.fetch(_cfg(release, train=8, pretrain=3), tmp_path / "w", tmp_path / "c", progress=False)


def test_coco_command_fetches_the_presets_splits(release, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_LITE_OUTPUTS", str(tmp_path / "out"))
    md5 = hashlib.md5(release.files[ZIP]).hexdigest()
    argv = ["coco", "--preset", "colab", "--split", "train=2", "--split", "test=1", "--url", release.url]
    assert cli.main(argv + ["--md5", md5]) == 0
    layout = Layout.for_preset("colab")
    assert len(list(layout.images("train").iterdir())) == 2 and len(list(layout.images("test").iterdir())) == 1
    assert Path(tmp_path / "out" / "coco" / "annotations" / "instances_val2017.json").is_file()
