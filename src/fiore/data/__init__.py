"""Data: the `Sample` record every reader and generator produces, dataset readers and the synthetic world."""

from fiore.data.sample import QA, Grounding, Object, Ref, Sample, TextItem

__all__ = ["QA", "Grounding", "Object", "Ref", "Sample", "TextItem"]
