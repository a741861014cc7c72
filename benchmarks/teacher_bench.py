"""Symbolic teacher throughput on 10,000 world contexts (all five sample types).

python benchmarks/teacher_bench.py [--contexts 10000]
"""

import argparse
import time

from llava_lite import world
from llava_lite.coco import SymbolicContext
from llava_lite.config import WorldConfig
from llava_lite.teachers import symbolic


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, default=10000)
    args = ap.parse_args()
    scenes = world.sample_world(WorldConfig(splits={"train": args.contexts}))["train"]
    contexts = [
        SymbolicContext(
            s.image_id,
            s.file_name,
            s.size,
            s.size,
            world.captions(s, __import__("random").Random(s.image_id)),
            s.objects(),
        )
        for s in scenes
    ]
    for kinds in (("conversation",), ("detail",), ("complex",), ("exact",), symbolic.TYPES):
        t0 = time.perf_counter()
        samples, _ = symbolic.generate(contexts, kinds)
        dt = time.perf_counter() - t0
        print(f"{'+'.join(kinds):42s} {len(samples):6d} samples in {dt:5.2f} s  {len(samples) / dt:8.0f} samples/s")


if __name__ == "__main__":
    main()
