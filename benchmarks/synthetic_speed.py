"""Per-scene cost of the synthetic world, split into generation and PNG writing.

    python benchmarks/synthetic_speed.py [--n 300]

Reports CPU time (process_time) per scene, best of 3 rounds: on a shared machine the minimum is the least disturbed.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np

from fiore.data.synthetic import make_sample


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=300)
    args = parser.parse_args()
    make_sample(0, 0)  # imports, font cache
    rounds = []
    for r in range(3):
        start = time.process_time()
        samples = [make_sample(1000 + r, i) for i in range(args.n)]
        rounds.append((time.process_time() - start) / args.n)
    start = time.process_time()
    for s in samples:
        s.image.save(io.BytesIO(), "PNG", compress_level=1)
    png = (time.process_time() - start) / args.n
    objects = [o for s in samples for o in s.objects]
    vertices = [len(r) // 2 for o in objects for r in o.polygons]
    print(f"generate: {min(rounds) * 1e3:.2f} ms/scene (rounds: {', '.join(f'{t * 1e3:.2f}' for t in rounds)})")
    print(f"png write: {png * 1e3:.2f} ms/scene")
    print(f"mean canvas {np.mean([s.width for s in samples]):.0f}x{np.mean([s.height for s in samples]):.0f}, "
          f"{len(objects) / args.n:.2f} objects, {sum(len(s.texts) for s in samples) / args.n:.2f} texts, "
          f"{np.mean(vertices):.1f} polygon vertices per ring (max {max(vertices)})")  # fmt: skip


if __name__ == "__main__":
    main()
