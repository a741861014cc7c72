"""The per-patch parts of llava_lite.probes: per-patch labels, the per-patch probe and the PCA map."""

import torch

from llava_lite import probes
from llava_lite.facts import Obj


def test_patch_labels_mark_the_patches_whose_centre_lies_in_a_box():
    objs = [Obj("red circle", (0.0, 0.0, 0.5, 0.5)), Obj("blue square", (0.74, 0.74, 1.0, 1.0))]
    colour = probes.patch_labels([objs], grid=4, attr="colour")[0].reshape(4, 4)
    red, blue = probes.CLASSES["colour"].index("red"), probes.CLASSES["colour"].index("blue")
    assert colour[:2, :2].eq(red).all() and colour[3, 3] == blue
    assert (colour == 0).sum() == 16 - 4 - 1
    shape = probes.patch_labels([objs], grid=4, attr="shape")[0]
    assert shape.max() == probes.CLASSES["shape"].index("square")
    size = probes.patch_labels([objs], grid=4, attr="size")[0].reshape(4, 4)  # sides 0.5 (large), 0.26 (large)
    large = probes.CLASSES["size"].index("large")
    assert size[:2, :2].eq(large).all() and size[3, 3] == large
    small = probes.patch_labels([[Obj("red circle", (0.0, 0.0, 0.2, 0.2))]], grid=4, attr="size")[0]
    assert small[0] == probes.CLASSES["size"].index("small") and small[1:].eq(0).all()


def test_patch_probe_separates_classes_that_are_linearly_apart_and_reports_chance():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (40, 16), generator=g)
    x = torch.randn(40, 16, 8, generator=g) * 0.1 + torch.nn.functional.one_hot(y, 8).float()
    res = probes.patch_probe(x[:30], y[:30], x[30:], y[30:])
    assert res["accuracy"] > 0.99 and res["majority"] < 0.5
    noise = probes.patch_probe(torch.randn(30, 16, 8, generator=g), y[:30], torch.randn(10, 16, 8, generator=g), y[30:])
    assert noise["accuracy"] < 0.6


def test_pca_map_is_a_square_rgb_image_in_unit_range():
    m = probes.pca_rgb(torch.randn(64, 32))
    assert m.shape == (8, 8, 3) and m.min() >= 0 and m.max() <= 1


def test_patch_probe_scores_object_patches_against_the_object_patch_majority_not_background():
    # train: 3 background patches, then class 1 twice and class 2 once; test: 2 background, class 2 twice, class 1 once
    x = torch.nn.functional.one_hot(torch.tensor([[0, 0, 0, 1, 1, 2], [0, 0, 2, 2, 1, 0]]), 3).float()
    y = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 0, 2, 2, 1, 0]])
    r = probes.patch_probe(x[:1], y[:1], x[1:], y[1:])
    assert r["patches"] == 6 and r["object_patch_count"] == 3
    assert r["majority"] == 3 / 6  # background, the all-patch majority, is half the test patches
    assert abs(r["object_majority"] - 1 / 3) < 1e-6  # class 1, the object-patch majority, is 1 of 3 object patches


def test_compare_layers_rows_carry_both_baselines_and_a_95_percent_interval(tmp_path):
    from PIL import Image

    class Tower:  # a 2x2 "tower" whose patch features are the patch's mean colour
        grid = 2

        def encode(self, paths, batch=None):
            return torch.stack([torch.tensor(
                [[float(v) / 255 for v in im.resize((2, 2)).getpixel((c, r))] for r in range(2) for c in range(2)]
            ) for im in (Image.open(p).convert("RGB") for p in paths)])  # fmt: skip

    class Ctx:
        def __init__(self, i, objs):
            self.file_name, self.objects = f"{i}.png", objs

    ctxs = []
    for i in range(8):
        Image.new("RGB", (2, 2), (255, 0, 0) if i % 2 else (0, 0, 255)).save(tmp_path / f"{i}.png")
        ctxs.append(Ctx(i, [Obj("red circle" if i % 2 else "blue square", (0.0, 0.0, 0.5, 0.5))]))
    (row,) = probes.compare_layers({-2: Tower()}, ctxs, tmp_path, attrs=("colour",), fit_share=0.5)
    assert row["object-patch majority"] == 0.5 and row["all-patch majority"] == 0.75
    share, interval = row["object patches [95%]"].split(" ", 1)
    lo, hi = (float(v) for v in interval.strip("[]").split(", "))
    assert lo <= float(share) <= hi and 0 < hi - lo < 1
