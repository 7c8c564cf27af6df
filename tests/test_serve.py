"""The HTTP server over real HTTP on loopback: answers, every limit, overload, API key, batching under load."""

from __future__ import annotations

import base64
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fake_florence import FakeFlorence, answer, running_server
from PIL import Image

from fiore.serve import ServeConfig, create_app


def png(w=64, h=48, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A PNG header declaring width x height pixels, and no pixel data (a decompression bomb's signature)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def expected(data: bytes, task: str, text=None, region=None) -> dict:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return answer(image, task, text, region).to_json()


@pytest.fixture
def server():
    """(base URL, fake) with default limits but small ones where tests probe them."""
    fake = FakeFlorence()
    config = ServeConfig(max_upload_bytes=200_000, max_pixels=500 * 500, max_text_chars=50, max_wait_ms=5)
    with running_server(create_app(fake, config)) as url:
        yield url, fake


def test_health_tasks_openapi_and_page(server):
    url, _ = server
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    tasks = httpx.get(f"{url}/v1/tasks").json()
    by_name = {t["name"]: t for t in tasks}
    assert by_name["od"] == {"name": "od", "token": "<OD>", "inputs": "none"}
    assert by_name["caption_to_phrase_grounding"]["inputs"] == "text"
    assert by_name["region_to_category"]["inputs"] == "region"
    schema = httpx.get(f"{url}/openapi.json").json()
    body = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and "<canvas" in page.text
    assert httpx.get(f"{url}/web/app.js").status_code == 200


def test_multipart_several_tasks_with_text_and_region(server):
    url, _ = server
    data = png()
    r = httpx.post(
        f"{url}/v1/predict",
        files={"image": ("x.png", data, "image/png")},
        data={
            "task": ["od", "caption", "caption_to_phrase_grounding", "region_to_category"],
            "text": "a red thing",
            "region": "1,2,30,40",
        },
    )
    assert r.status_code == 200, r.text
    got = r.json()
    assert list(got) == ["od", "caption", "caption_to_phrase_grounding", "region_to_category"]
    assert got["od"] == expected(data, "od")
    assert got["caption"] == expected(data, "caption")
    assert got["caption_to_phrase_grounding"] == expected(data, "caption_to_phrase_grounding", "a red thing")
    # each task gets only its own input: the region goes to region_to_category alone
    assert got["region_to_category"] == expected(data, "region_to_category", region=(1.0, 2.0, 30.0, 40.0))


def test_json_body_and_all(server):
    url, fake = server
    data = png(colour=(10, 200, 90))
    r = httpx.post(f"{url}/v1/predict", json={"image": base64.b64encode(data).decode(), "tasks": ["all"]})
    assert r.status_code == 200, r.text
    no_input = [t["name"] for t in httpx.get(f"{url}/v1/tasks").json() if t["inputs"] == "none"]
    assert list(r.json()) == no_input
    assert r.json()["ocr_with_region"] == expected(data, "ocr_with_region")
    r = httpx.post(
        f"{url}/v1/predict",
        json={
            "image": "data:image/png;base64," + base64.b64encode(data).decode(),
            "tasks": ["region_to_category"],
            "region": [0, 0, 10, 10],
        },
    )
    assert r.json() == {"region_to_category": expected(data, "region_to_category", region=(0.0, 0.0, 10.0, 10.0))}


@pytest.mark.parametrize(
    "kwargs, status, words",
    [
        (dict(data={"task": "nope"}), 400, "unknown task 'nope'"),
        (dict(data={}), 400, "at least one task"),
        (dict(data={"task": "caption_to_phrase_grounding"}), 400, "needs a text input"),
        (dict(data={"task": "region_to_category"}), 400, "needs a region"),
        (dict(data={"task": "region_to_category", "region": "1,2,3"}), 400, "four"),
        (dict(data={"task": "region_to_category", "region": "10,10,5,20"}), 400, "x1 <= x2"),
        (dict(data={"task": "region_to_category", "region": "65,0,70,10"}), 400, "outside the 64x48 image"),
        (dict(data={"task": "vqa", "text": "x" * 51}), 413, "limit of 50"),
        (dict(data={"task": "od"}, image=png(501, 500)), 413, "limit of 250000"),
        (dict(data={"task": "od"}, image=b"not an image"), 400, "cannot read image"),
        (dict(data={"task": "od"}, image=bomb_png(30000, 30000)), 413, "too large"),  # past PIL's own limit
        (dict(data={"task": "od"}, image=png(1, 1)), 400, "each side must be at least"),
        (dict(data={"task": "od"}, image=b"\0" * 200_001), 413, "limit of 200000 bytes"),
        (dict(data={"task": "od", "coords": "exact"}), 400, '"coords" must be one of bin, expected'),
    ],
)
def test_limits_and_bad_input(server, kwargs, status, words):
    url, fake = server
    image = kwargs.pop("image", png())
    r = httpx.post(f"{url}/v1/predict", files={"image": ("x.png", image, "image/png")}, **kwargs)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    assert fake.calls == []  # rejected before any compute


def test_json_errors_and_no_url_fetching(server):
    url, fake = server
    for payload, words in [
        ({"image": "https://example.com/cat.png", "tasks": ["od"]}, "does not fetch URLs"),
        ({"image": "!!!", "tasks": ["od"]}, "not valid base64"),
        ({"tasks": ["od"]}, 'missing "image"'),
        ({"image": base64.b64encode(png()).decode(), "tasks": "od", "text": 5}, '"text" must be a string'),
    ]:
        r = httpx.post(f"{url}/v1/predict", json=payload)
        assert r.status_code == 400 and words in r.json()["error"], r.text
    r = httpx.post(f"{url}/v1/predict", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = httpx.post(f"{url}/v1/predict", content=b"abc", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = httpx.post(f"{url}/v1/predict", data={"task": "od", "image": "http://example.com/x.png"})
    assert r.status_code == 400 and "does not fetch URLs" in r.json()["error"]
    assert fake.calls == []


def test_chunked_body_over_the_limit_is_cut_off(server):
    url, fake = server

    def chunks():  # no Content-Length: the server must count while reading
        for _ in range(30):
            yield b"\0" * 10_000

    r = httpx.post(f"{url}/v1/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit of 200000 bytes" in r.json()["error"]
    assert fake.calls == []


def test_api_key():
    with running_server(create_app(FakeFlorence(), ServeConfig(api_key="s3cret"))) as url:
        files = {"image": ("x.png", png(), "image/png")}
        assert httpx.post(f"{url}/v1/predict", files=files, data={"task": "od"}).status_code == 401
        r = httpx.post(f"{url}/v1/predict", files=files, data={"task": "od"}, headers={"X-API-Key": "wrong"})
        assert r.status_code == 401 and "API key" in r.json()["error"]
        r = httpx.post(f"{url}/v1/predict", files=files, data={"task": "od"}, headers={"X-API-Key": "s3cret"})
        assert r.status_code == 200
        assert httpx.get(f"{url}/v1/tasks", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{url}/v1/tasks").status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200  # liveness probes need no key


def test_overload_answers_503_with_retry_after():
    gate = threading.Event()
    fake = FakeFlorence(gate=gate)
    config = ServeConfig(max_batch=1, max_queue=2, max_wait_ms=0, retry_after_s=3)
    with running_server(create_app(fake, config)) as url:
        files = {"image": ("x.png", png(), "image/png")}

        def post():
            return httpx.post(f"{url}/v1/predict", files=files, data={"task": "od"}, timeout=30)

        with ThreadPoolExecutor(8) as pool:
            first = pool.submit(post)
            while not fake.calls:  # the worker holds request 1 inside the (blocked) engine
                threading.Event().wait(0.01)
            queued = [pool.submit(post) for _ in range(2)]
            while httpx.get(f"{url}/health").json()["queued"] < 2:
                threading.Event().wait(0.01)
            rejected = post()
            assert rejected.status_code == 503
            assert rejected.headers["retry-after"] == "3"
            assert "busy" in rejected.json()["error"]
            gate.set()
            assert [f.result().status_code for f in [first, *queued]] == [200, 200, 200]
        assert httpx.get(f"{url}/v1/stats").json()["rejected_overload"] == 1


def test_engine_failure_is_500_and_server_survives():
    class Broken(FakeFlorence):
        def answer(self, image, request):
            if request.task.name == "od":
                raise RuntimeError("boom")
            return super().answer(image, request)

    with running_server(create_app(Broken())) as url:
        files = {"image": ("x.png", png(), "image/png")}
        r = httpx.post(f"{url}/v1/predict", files=files, data={"task": "od"})
        assert r.status_code == 500 and "boom" in r.json()["error"]
        assert httpx.post(f"{url}/v1/predict", files=files, data={"task": "caption"}).status_code == 200


def test_50_concurrent_requests_batched_and_correct():
    fake = FakeFlorence(delay=0.02)  # an engine pass takes time, so requests pile up and get batched
    config = ServeConfig(max_batch=8, max_wait_ms=20, max_queue=64)
    images = [png(32 + i, 32, (i * 5 % 256, 255 - i * 5 % 256, i * 3 % 256)) for i in range(50)]
    tasks = ["od", "caption"]
    with running_server(create_app(fake, config)) as url:
        with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=60)) as client:

            def post(i):
                files = {"image": (f"{i}.png", images[i], "image/png")}
                return client.post(f"{url}/v1/predict", files=files, data={"task": tasks})

            with ThreadPoolExecutor(50) as pool:
                responses = list(pool.map(post, range(50)))
            stats = client.get(f"{url}/v1/stats").json()
    for data, r in zip(images, responses, strict=True):
        assert r.status_code == 200, r.text
        assert r.json() == {t: expected(data, t) for t in tasks}
    sizes = {int(k): v for k, v in stats["engine_batch_sizes"].items()}
    assert sum(k * v for k, v in sizes.items()) == 50  # every image computed exactly once
    assert max(sizes) > 1 and max(sizes) <= 8
    assert max(int(r.headers["x-fiore-batch-size"]) for r in responses) > 1
    assert max(n for _, n in fake.calls) > 1


def test_duplicate_fields_and_truncated_multipart_bodies_are_named(server):
    url, fake = server
    two = [("image", ("a.png", png(), "image/png")), ("image", ("b.png", png(20, 20), "image/png"))]
    r = httpx.post(f"{url}/v1/predict", files=two, data={"task": "od"})
    assert r.status_code == 400 and '2 "image" fields' in r.json()["error"]
    request = httpx.Request("POST", f"{url}/v1/predict", files={"image": ("x.png", png(), "image/png")},
                            data={"task": "od"})  # fmt: skip
    body = request.read()
    headers = {"content-type": request.headers["content-type"]}
    r = httpx.post(f"{url}/v1/predict", content=body[: len(body) - 40], headers=headers)
    assert r.status_code == 400 and "truncated" in r.json()["error"]
    assert httpx.post(f"{url}/v1/predict", content=body, headers=headers).status_code == 200
    assert len(fake.calls) == 1  # only the whole request reached the engine


def test_a_region_partly_outside_is_clamped_as_in_the_api(server):
    """CLI, server and Python API share one rule: a region must overlap the image; what overshoots is clamped."""
    from fiore import tasks

    url, _ = server
    r = httpx.post(f"{url}/v1/predict", files={"image": ("x.png", png(), "image/png")},
                   data={"task": "region_to_category", "region": "0,0,65,10"})  # fmt: skip
    assert r.status_code == 200, r.text
    r2c = tasks.get("region_to_category")
    assert r2c.prompt(region=[0, 0, 65, 10], image_size=(64, 48)) == r2c.prompt(region=[0, 0, 64, 10],
                                                                                 image_size=(64, 48))  # fmt: skip
    with pytest.raises(tasks.TaskInputError, match="outside"):
        r2c.prompt(region=[65, 0, 70, 10], image_size=(64, 48))


def _wait_until(condition, timeout: float = 30.0) -> None:
    deadline = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        deadline.wait(0.01)
    raise AssertionError("condition not reached")


def _first_then_the_rest_queued(post, n: int, fake, gate, client, url) -> list:
    """post(0) holds the engine (its `gate` closed) while post(1..n-1) queue behind it; then the gate opens and the
    queued requests form one worker pass. Returns the n responses in request order."""
    with ThreadPoolExecutor(n) as pool:
        first = pool.submit(post, 0)
        _wait_until(lambda: fake.calls)
        rest = [pool.submit(post, i) for i in range(1, n)]
        _wait_until(lambda: client.get(f"{url}/health").json()["queued"] == n - 1)
        gate.set()
        return [first.result(), *(f.result() for f in rest)]


MIXED = [  # (task, text, region): every kind of input, some requests asking the same
    ("od", None, None),
    ("caption", None, None),
    ("region_to_category", None, "4,4,40,30"),
    ("region_to_category", None, "10,10,60,40"),
    ("caption_to_phrase_grounding", "a red square", None),
    ("caption_to_phrase_grounding", "a blue dot", None),
    ("od", None, None),
    ("caption", None, None),
]


def test_a_batch_mixing_tasks_texts_and_regions_answers_each_request_its_own_question():
    gate = threading.Event()
    fake = FakeFlorence(gate=gate)
    config = ServeConfig(max_batch=16, max_wait_ms=0, max_queue=64)
    images = [png(40 + 3 * i, 36 + 2 * i, (20 * i, 200 - 20 * i, 90)) for i in range(len(MIXED))]
    with running_server(create_app(fake, config)) as url, httpx.Client(timeout=60) as client:

        def post(i):
            task, text, region = MIXED[i]
            data = {"task": task, **({"text": text} if text else {}), **({"region": region} if region else {})}
            return client.post(f"{url}/v1/predict", files={"image": ("x.png", images[i], "image/png")}, data=data)

        responses = _first_then_the_rest_queued(post, len(MIXED), fake, gate, client, url)
        stats = client.get(f"{url}/v1/stats").json()
    for i, r in enumerate(responses):
        task, text, region = MIXED[i]
        box = [float(v) for v in region.split(",")] if region else None
        assert r.status_code == 200, r.text
        assert r.json() == {task: expected(images[i], task, text, box)}, MIXED[i]
    # one worker pass took the 7 queued requests, and one predictor call answered them all, each image asked its own
    assert {int(k): v for k, v in stats["requests_per_pass"].items()} == {1: 1, len(MIXED) - 1: 1}
    assert [n for _, n in fake.calls[1:]] == [len(MIXED) - 1]
    asked = sorted([(r.task.name, r.text, r.region) for r in reqs] for reqs in fake.requests[1])
    assert asked == sorted(
        [(task, text, tuple(float(v) for v in region.split(",")) if region else None)]
        for task, text, region in MIXED[1:]
    )


def test_sub_bin_coords_per_request_each_decoding_in_its_own_pass():
    """coords="expected" (multipart or JSON) reaches the predictor as its option; a batch mixing decodings runs one
    predictor pass per decoding, each request answered its own question."""
    gate = threading.Event()
    fake = FakeFlorence(gate=gate)
    config = ServeConfig(max_batch=16, max_wait_ms=0, max_queue=64)
    images = [png(40 + 3 * i, 36 + 2 * i, (20 * i, 200 - 20 * i, 90)) for i in range(5)]
    coords = [None, "expected", "bin", "expected", None]  # None: the field left out (bin)
    with running_server(create_app(fake, config)) as url, httpx.Client(timeout=60) as client:

        def post(i):
            if i == 3:  # JSON
                body = {"image": base64.b64encode(images[i]).decode(), "tasks": ["od"], "coords": coords[i]}
                return client.post(f"{url}/v1/predict", json=body)
            data = {"task": "od", **({"coords": coords[i]} if coords[i] else {})}
            return client.post(f"{url}/v1/predict", files={"image": ("x.png", images[i], "image/png")}, data=data)

        responses = _first_then_the_rest_queued(post, len(images), fake, gate, client, url)
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        assert r.json() == {"od": expected(images[i], "od")}
    # the first request alone, then the four queued ones (in arrival order): the bin pair and the expected pair, one
    # pass each
    assert fake.options[0] == {} and sorted(fake.options[1:], key=len) == [{}, {"coords": "expected"}]
    assert [n for _, n in fake.calls] == [1, 2, 2]
    assert sorted(r.headers["X-Fiore-Batch-Size"] for r in responses[1:]) == ["2", "2", "2", "2"]


def test_one_failing_group_in_a_shared_batch_fails_alone():
    gate = threading.Event()

    class BrokenOnGrounding(FakeFlorence):
        def answer(self, image, request):
            if request.task.name == "caption_to_phrase_grounding":
                raise RuntimeError("boom")
            return super().answer(image, request)

    fake = BrokenOnGrounding(gate=gate)
    config = ServeConfig(max_batch=16, max_wait_ms=0, max_queue=64)
    with running_server(create_app(fake, config)) as url, httpx.Client(timeout=60) as client:
        files = {"image": ("x.png", png(), "image/png")}

        def post(data):
            return client.post(f"{url}/v1/predict", files=files, data=data)

        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(post, {"task": "od"})
            _wait_until(lambda: fake.calls)
            bad = pool.submit(post, {"task": "caption_to_phrase_grounding", "text": "a dot"})
            good = pool.submit(post, {"task": "caption"})
            _wait_until(lambda: client.get(f"{url}/health").json()["queued"] == 2)
            gate.set()
            first, bad, good = first.result(), bad.result(), good.result()
        stats = client.get(f"{url}/v1/stats").json()
    assert stats["requests_per_pass"] == {"1": 1, "2": 1}  # the failing and the good request shared a pass
    assert bad.status_code == 500 and "boom" in bad.json()["error"]
    assert good.status_code == 200 and good.json() == {"caption": expected(png(), "caption")}
    assert first.status_code == 200


def test_a_client_that_gives_up_costs_no_engine_work():
    gate = threading.Event()
    fake = FakeFlorence(gate=gate)
    config = ServeConfig(max_batch=16, max_wait_ms=0, max_queue=64)
    with running_server(create_app(fake, config)) as url:
        files = {"image": ("x.png", png(), "image/png")}
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, f"{url}/v1/predict", files=files, data={"task": "od"}, timeout=60)
            _wait_until(lambda: fake.calls)
            with pytest.raises(httpx.TimeoutException):  # queued behind the blocked engine, then gone
                httpx.post(f"{url}/v1/predict", files=files, data={"task": "caption"}, timeout=0.5)
            _wait_until(lambda: httpx.get(f"{url}/v1/stats").json()["abandoned"] == 1)
            gate.set()
            assert first.result().status_code == 200
        assert httpx.post(f"{url}/v1/predict", files=files, data={"task": "ocr"}, timeout=60).status_code == 200
    assert [task for task, _ in fake.calls] == ["od", "ocr"]  # the abandoned caption never ran
