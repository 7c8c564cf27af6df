"""fiore: a Florence-2-style vision foundation model — one encoder-decoder for every vision task."""

from fiore import tasks
from fiore.config import ModelConfig, TextConfig, VisionConfig, preset
from fiore.florence import Florence, load
from fiore.request import Request

__all__ = ["Florence", "ModelConfig", "Request", "TextConfig", "VisionConfig", "load", "preset", "tasks"]
__version__ = "0.1.0"
