"""Test helpers for the user-facing layer: a Florence-like fake whose answers depend on the image pixels, and a
uvicorn server on a free loopback port.

The fake returns real `fiore.results` objects whose numbers come from the image (mean colour, size), so a
response delivered to the wrong request, or computed from the wrong image, is caught.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import threading
import time

import numpy as np

from fiore.results import Boxes, Label, Mixed, Phrases, Polygons, Quads, Text


class FakeEngine:
    """A Florence-like engine: `predictor()` gives a `FakePredictor` (`set_images`, `predict` lists of
    `fiore.Request`s) that answers each request with `self.answer(image, request)`.

    `calls` records (task names asked in the pass, in order, comma-joined; number of images) per predict call,
    `requests` the request lists themselves and `options` the predictor options.
    """

    def __init__(self):
        self.calls: list[tuple[str, int]] = []
        self.requests: list[list[list]] = []
        self.options: list[dict] = []
        self.lock = threading.Lock()

    def predictor(self, **options):
        with self.lock:
            self.options.append(options)
        return FakePredictor(self)

    def answer(self, image, request):
        raise NotImplementedError

    def _wait(self):
        pass


class FakeFlorence(FakeEngine):
    """Answers computed from the image pixels (`answer` below). `gate` (a threading.Event) blocks every predict
    call until set; `delay` sleeps per call."""

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None):
        super().__init__()
        self.delay, self.gate = delay, gate

    def answer(self, image, request):
        """The Result for one request on one image (subclasses override to fail or change answers)."""
        region = list(request.region) if request.region is not None else None
        return answer(image, request.task.name, request.text, region)

    def _wait(self):
        if self.gate is not None:
            self.gate.wait(timeout=30)
        if self.delay:
            time.sleep(self.delay)


class FakePredictor:
    def __init__(self, florence: FakeEngine):
        self.florence, self.images = florence, None

    def set_images(self, images):
        self.images = list(images)

    def predict(self, requests):
        f = self.florence
        assert self.images is not None and len(requests) == len(self.images)
        names = ",".join(dict.fromkeys(r.task.name for reqs in requests for r in reqs))
        with f.lock:
            f.calls.append((names, len(self.images)))
            f.requests.append([list(reqs) for reqs in requests])
        f._wait()
        return [[f.answer(im, r) for r in reqs] for im, reqs in zip(self.images, requests, strict=True)]


def answer(image, task: str, text=None, region=None):
    """A deterministic Result for `task` computed from the image."""
    W, H = image.size
    m = float(np.asarray(image, dtype=np.float32).mean()) / 255  # 0..1
    box = [W * 0.1 * m, H * 0.2 * m, W * (0.5 + 0.4 * m), H * (0.6 + 0.3 * m)]
    ring = [box[0], box[1], box[2], box[1], box[2], box[3], box[0], box[3]]
    score = round(0.5 + 0.45 * m, 4)
    label = f"thing{int(m * 10)}"
    common = {"task": task, "score": score}
    if task in ("od", "dense_region_caption", "region_proposal"):
        small = [box[0] + 1, box[1] + 1, box[0] + W * 0.1, box[1] + H * 0.1]
        return Boxes([box, small], [label, "dot"], [score, round(score / 2, 4)], **common)
    if task == "open_vocabulary_detection":
        return Mixed(boxes=Boxes([box], [text or label], [score]), **common)
    if task == "ocr_with_region":
        return Quads([ring], [f"TXT{int(m * 100)}"], [score], **common)
    if task in ("referring_expression_segmentation", "region_to_segmentation"):
        return Polygons([[ring]], [text or ""], [score], **common)
    if task == "caption_to_phrase_grounding":
        return Phrases([text or label], [[box]], [score], **common)
    if task in ("region_to_category", "classify"):
        return Label(f"{label} at {[float(v) for v in region]}" if region else label, **common)
    return Text(f"{task} of a {W}x{H} image with mean {m:.4f}" + (f" / {text}" if text else ""), **common)


@contextlib.contextmanager
def running_server(app):
    """Serve `app` with uvicorn in a thread on a free 127.0.0.1 port; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", limit_concurrency=None))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def save_tiny_model(path, seed: int = 0, contrastive_dim: int = 0):
    """A random-weight `fiore.preset("tiny")` model with a small trained tokenizer, saved to `path` for `fiore.load`.

    Weights are drawn wider than the training init so logits are crisp: greedy decoding then has no near-ties,
    and a request batched with others decodes the same tokens as alone.
    """
    import math

    import torch

    from fiore.config import preset
    from fiore.florence import Florence
    from fiore.model import FlorenceModel
    from fiore.tokenizer import Tokenizer

    words = "a red green blue star disc cross square triangle the of in on image small large text cow bee".split()
    g = np.random.default_rng(seed)
    tok = Tokenizer.train([" ".join(g.choice(words, size=8)) for _ in range(300)], vocab_size=300)
    # 64x64 input: the tiny architecture at a sixteenth of its vision cost (the suite shares 2 CPU cores)
    config = preset("tiny").replace(
        text={"vocab_size": tok.vocab_size}, image_size=(64, 64), contrastive_dim=contrastive_dim
    )
    torch.manual_seed(seed)
    model = FlorenceModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "shared" not in name and "embed_positions" not in name:
                p.normal_(0, 1.5 / math.sqrt(p.shape[1]))
        model.language_model.shared.weight.normal_(0, 0.5)
    return Florence(model, config, tokenizer=tok).save(path)


def same_json(a, b, rel_tol: float = 1e-4) -> bool:
    """Equal as JSON (tuples = lists), floats to `rel_tol` relative: batched matmuls move scores in the last bits."""
    a, b = json.loads(json.dumps(a)), json.loads(json.dumps(b))
    return _same(a, b, rel_tol)


def _same(a, b, rel_tol: float) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=rel_tol)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k], rel_tol) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y, rel_tol) for x, y in zip(a, b, strict=True))
    return a == b
