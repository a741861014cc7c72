"""How fast is the shapes world? Goal: 10,000 scenes at 64 px, with annotations, in under 60 s.

    python benchmarks/world_bench.py [--scenes 10000] [--size 64]

Prints scenes/s for sampling, rendering + PNG writing, and the whole generate() call.
"""

import argparse
import tempfile
import time

from llava_lite import world
from llava_lite.config import WorldConfig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenes", type=int, default=10000)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    cfg = WorldConfig(image_size=args.size, splits={"train": args.scenes})
    t0 = time.perf_counter()
    scenes = world.sample_world(cfg)["train"]
    t_sample = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        world.generate(cfg, d, progress=False)
        t_all = time.perf_counter() - t0
    n = len(scenes)
    print(f"scenes: {n} at {args.size} px")
    print(f"sample layouts only : {t_sample:6.2f} s  {n / t_sample:9.0f} scenes/s")
    print(
        f"generate (PNG + COCO): {t_all:6.2f} s  {n / t_all:9.0f} scenes/s  "
        f"(goal: < 60 s -> {'met' if t_all < 60 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
