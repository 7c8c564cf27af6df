"""`Florence`: a loaded model with its config, tokenizer and processor — the object `fiore.load` returns."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import torch

from fiore.checkpoint import CheckpointError, has_tokenizer_files, load_model, save_checkpoint, tokenizer_files
from fiore.config import ModelConfig
from fiore.model import FlorenceModel


def default_model_dir() -> Path:
    return Path(str(resources.files("fiore") / "default_model"))


def checkpoint_dir(path: str | Path | None) -> Path:
    """The directory `fiore.load(path)` reads: the path itself, a Hugging Face repository id resolved through
    huggingface_hub's cache (`fiore.hub`), or, for None, the model shipped with fiore."""
    from fiore import hub

    if path is not None and hub.looks_like_repo_id(path):
        return Path(hub.resolve(str(path)))
    if path is None:
        path = default_model_dir()
        if not (path / "config.json").exists():
            raise CheckpointError(
                f"no default model is shipped in this installation ({path} is missing); "
                "pass a checkpoint directory to fiore.load(path)"
            )
    return Path(path)


class Florence:
    """A model plus what it needs to read prompts and images. Tokenizer and processor are built on first use."""

    def __init__(
        self, model: FlorenceModel, config: ModelConfig, source: str | Path | None = None, tokenizer=None
    ) -> None:
        self.model = model
        self.config = config
        self.source = Path(source) if source is not None else None  # the checkpoint directory, if any
        self._tokenizer = tokenizer
        self._processor = None

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        strategies: str | Iterable[str] | None = None,
        quantize: str | None = None,
    ) -> Florence:
        """Load a checkpoint directory (either Florence-2 format) or a Hugging Face repository id such as
        "microsoft/Florence-2-base" (from huggingface_hub's cache, downloaded when allowed: `fiore.hub`); no path =
        the model shipped with fiore.

        The model is prepared for inference (`fiore.model.inference.prepare_for_inference`): `strategies` "auto"
        (default, or $FIORE_STRATEGIES) keeps the speed strategies that measure faster on this machine, "none" the
        plain modules (to train the loaded model), "all" or a list of names forces them. `quantize="int8"` (CPU,
        float32) runs every linear in int8 (docs/performance.md has its speed and quality); such a model cannot be
        saved."""
        from fiore.model.inference import check_quantize, prepare_for_inference

        check_quantize(quantize, device, dtype)
        path = checkpoint_dir(path)

        model, config = load_model(path, device=device, dtype=dtype)
        return cls(prepare_for_inference(model, strategies, quantize=quantize), config, source=path)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def tokenizer(self):
        """`fiore.tokenizer.Tokenizer` read from the checkpoint directory."""
        if self._tokenizer is None:
            if self.source is None or not has_tokenizer_files(self.source):
                where = f"checkpoint {self.source}" if self.source is not None else "this in-memory model"
                raise CheckpointError(
                    f"{where} has no tokenizer files (tokenizer.json): the model is loaded, but prompts cannot be "
                    "tokenized nor a processor built; save a tokenizer into the directory or pass one to Florence"
                )
            from fiore.tokenizer import Tokenizer  # imported lazily: only needed once text is involved

            self._tokenizer = Tokenizer.from_dir(self.source)
        return self._tokenizer

    @property
    def processor(self):
        """`fiore.processor.Processor` for this model's tokenizer and input size."""
        if self._processor is None:
            from fiore.processor import Processor

            self._processor = Processor(self.tokenizer, self.config.image_size)
        return self._processor

    def save(self, path: str | Path) -> Path:
        """Write a transformers-native checkpoint directory (config, weights and tokenizer files)."""
        path = Path(path)
        save_checkpoint(self.model, self.config, path, tokenizer=self._tokenizer)
        if self.source is not None and self.source.resolve() != path.resolve():
            # Carry over tokenizer/processor files the save did not write (all of them if never loaded).
            for f in tokenizer_files(self.source):
                if not (path / f.name).exists():
                    shutil.copy2(f, path / f.name)
        return path

    # -- inference (issue 4): thin bindings; the work is in fiore.predictor and fiore.generate --------------------

    def predictor(self, **options):
        """A `fiore.predictor.Predictor`: `set_images` once, then `predict` lists of `fiore.Request`s (and
        `classify`) against those encodings. Options: score_mode, coords, max_rows, image_batch, generation fields."""
        from fiore.predictor import Predictor

        return Predictor(self, **options)

    def predict(self, images, task, text=None, region=None, **options):
        """One task on one image (-> Result) or a list of images (-> list[Result]). See `fiore.predictor.predict`."""
        from fiore.predictor import predict

        return predict(self, images, task, text=text, region=region, **options)

    def run(self, images, tasks, **options):
        """Many tasks, one vision encoding per image (-> {task: Result}, or a list of them). See `predictor.run`."""
        from fiore.predictor import run

        return run(self, images, tasks, **options)

    def classify(self, image, labels, region=None, task=None):
        """Rank candidate labels by sequence log-likelihood (-> Label with `ranking`). See `predictor.classify`."""
        from fiore.predictor import classify

        return classify(self, image, labels, region=region, task=task)

    # -- image-text heads (models trained with a contrastive phase): see fiore.embeddings ------------------------

    def embed_images(self, images):
        """Images -> (N, D) unit image embeddings."""
        from fiore.embeddings import embed_images

        return embed_images(self, images)

    def embed_texts(self, texts):
        """Texts -> (M, D) unit text embeddings, comparable with `embed_images` by dot product."""
        from fiore.embeddings import embed_texts

        return embed_texts(self, texts)

    def zero_shot(self, image, labels, template=None):
        """Zero-shot classification from label prompts (-> Label with `ranking`). See `embeddings.zero_shot`."""
        from fiore.embeddings import zero_shot

        return zero_shot(self, image, labels, template=template)

    def search(self, query, images, top_k=None):
        """Rank images by similarity to a text query (-> [(image, similarity), ...]). See `embeddings.search`."""
        from fiore.embeddings import search

        return search(self, query, images, top_k=top_k)

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        if self.model.quantized:
            return f"Florence({self.model.quantized} linears, {self.device}, source={self.source})"
        return f"Florence({n / 1e6:.1f}M params, {self.dtype}, {self.device}, source={self.source})"


def load(
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    strategies: str | Iterable[str] | None = None,
    quantize: str | None = None,
) -> Florence:
    """Load a Florence-2 checkpoint, prepared for inference; with no path, the model shipped in `fiore/default_model/`.
    See `Florence.load`."""
    return Florence.load(path, device=device, dtype=dtype, strategies=strategies, quantize=quantize)
