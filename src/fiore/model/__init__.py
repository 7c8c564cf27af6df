"""Florence-2 in plain PyTorch: DaViT vision tower, image projector, BART-style encoder-decoder, KV cache."""

from fiore.model.cache import DecoderCache
from fiore.model.davit import DaViT
from fiore.model.florence import SHARED_KEY, TIED_KEYS, FlorenceModel
from fiore.model.projector import Projector
from fiore.model.text import LanguageModel

__all__ = ["SHARED_KEY", "TIED_KEYS", "DaViT", "DecoderCache", "FlorenceModel", "LanguageModel", "Projector"]
