"""Throughput of `fiore serve` with and without request batching, side by side (real HTTP on loopback).

    python benchmarks/serve_batching.py [--model DIR] [--requests 40] [--max-new-tokens 8]

Without --model, a tiny random-weight model (tests/fake_florence.save_tiny_model) is built in a temp dir. Each
setting runs twice, interleaved, so machine load drifts affect both alike; prints requests/s and the ratio.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

import fiore
from fiore.serve import ServeConfig, create_app

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from fake_florence import running_server, save_tiny_model  # noqa: E402


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def throughput(florence, max_batch: int, images: list[bytes], max_new_tokens: int) -> tuple[float, dict]:
    config = ServeConfig(max_batch=max_batch, max_wait_ms=20, max_queue=len(images) + 8, max_new_tokens=max_new_tokens)
    with running_server(create_app(florence, config)) as url, httpx.Client(timeout=600) as client:

        def post(i):
            files = {"image": ("x.png", images[i], "image/png")}
            r = client.post(f"{url}/v1/predict", files=files, data={"task": ["caption", "od"]})
            r.raise_for_status()

        post(0)  # warm-up
        start = time.perf_counter()
        with ThreadPoolExecutor(len(images)) as pool:
            list(pool.map(post, range(len(images))))
        rate = len(images) / (time.perf_counter() - start)
        return rate, client.get(f"{url}/v1/stats").json()["engine_batch_sizes"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    args = ap.parse_args()
    model = args.model or save_tiny_model(tempfile.mkdtemp())
    florence = fiore.load(model)
    images = [png(i) for i in range(args.requests)]
    rates: dict[int, list[float]] = {1: [], 16: []}
    for _ in range(2):
        for max_batch in rates:
            rate, sizes = throughput(florence, max_batch, images, args.max_new_tokens)
            rates[max_batch].append(rate)
            print(f"max_batch={max_batch:2d}: {rate:6.1f} req/s  engine batch sizes {sizes}")
    best = {k: max(v) for k, v in rates.items()}
    print(f"batched / unbatched throughput: {best[16] / best[1]:.2f}x")


if __name__ == "__main__":
    main()
