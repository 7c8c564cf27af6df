"""The server in front of the real engine: a tiny random-weight model loaded with `fiore.load`.

Random weights give degenerate answers, but the JSON shape and the path through `Florence.run` are real. Correct
= every response to 50 concurrent requests equals the response to the same request made alone (greedy decoding
is deterministic; batched matmuls may move scores in the last bits, hence the float tolerance).
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fake_florence import running_server, same_json, save_tiny_model
from PIL import Image

import fiore
from fiore.serve import ServeConfig, create_app


@pytest.fixture(scope="module")
def florence(tmp_path_factory):
    return fiore.load(save_tiny_model(tmp_path_factory.mktemp("tiny")))


def png(seed: int) -> bytes:
    g = np.random.default_rng(seed)
    w, h = 40 + 7 * seed, 30 + 5 * seed
    buf = io.BytesIO()
    Image.fromarray(g.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_real_engine_50_concurrent_requests_match_alone(florence):
    config = ServeConfig(max_batch=16, max_wait_ms=50, max_queue=64, max_new_tokens=4)
    images = [png(i) for i in range(5)]
    with running_server(create_app(florence, config)) as url, httpx.Client(timeout=300) as client:

        def post(i):
            files = {"image": ("x.png", images[i % len(images)], "image/png")}
            return client.post(f"{url}/v1/predict", files=files, data={"task": ["caption", "od"]})

        alone = []
        for i in range(len(images)):
            r = post(i)
            assert r.status_code == 200, r.text
            assert r.headers["x-fiore-batch-size"] == "1"
            alone.append(r.json())
        for i, answer in enumerate(alone):  # the server answers what the library answers
            direct = florence.run(Image.open(io.BytesIO(images[i])), ["caption", "od"], max_new_tokens=4)
            assert same_json(answer, {k: v.to_json() for k, v in direct.items()}), (answer, direct)
        with ThreadPoolExecutor(50) as pool:
            responses = list(pool.map(post, range(50)))
        stats = client.get(f"{url}/v1/stats").json()
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        assert same_json(r.json(), alone[i % len(images)]), (i, r.json(), alone[i % len(images)])
    sizes = {int(k): v for k, v in stats["engine_batch_sizes"].items()}
    assert sum(k * v for k, v in sizes.items()) == 55  # 5 alone + 50 concurrent, each image run once
    assert max(sizes) > 1


def test_real_engine_tasks_with_inputs(florence):
    config = ServeConfig(max_new_tokens=4)
    with running_server(create_app(florence, config)) as url:
        files = {"image": ("x.png", png(1), "image/png")}
        data = {"task": ["region_to_category", "caption_to_phrase_grounding"], "region": "2,3,20,25", "text": "a star"}
        r = httpx.post(f"{url}/v1/predict", files=files, data=data, timeout=120)
        assert r.status_code == 200, r.text
        image, short = Image.open(io.BytesIO(png(1))), {"max_new_tokens": 4}
        direct = {
            "region_to_category": florence.predict(image, "region_to_category", region=(2, 3, 20, 25), **short),
            "caption_to_phrase_grounding": florence.predict(image, "caption_to_phrase_grounding", text="a star",
                                                            **short),
        }  # fmt: skip
        assert same_json(r.json(), {k: v.to_json() for k, v in direct.items()}), r.json()


def test_real_engine_sub_bin_coords_answer_as_the_library():
    """The shipped model (its location distributions are spread, so expected coordinates move off the bin centres)
    on the example scene: each decoding over HTTP equals the library's."""
    shipped = fiore.load(None)
    scene = Path(__file__).resolve().parents[1] / "examples" / "scene.png"
    with running_server(create_app(shipped, ServeConfig())) as url:
        answers = {}
        for coords in ("bin", "expected"):
            files = {"image": ("scene.png", scene.read_bytes(), "image/png")}
            r = httpx.post(f"{url}/v1/predict", files=files, data={"task": "od", "coords": coords}, timeout=120)
            assert r.status_code == 200, r.text
            direct = shipped.predict(Image.open(scene), "od", coords=coords)
            assert same_json(r.json(), {"od": direct.to_json()}), (coords, r.json())
            answers[coords] = r.json()["od"]["boxes"]
    assert answers["bin"] and answers["expected"] != answers["bin"]
