"""Where the official reference files live: `../shared/reference` beside the project checkout (never copied in)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = ROOT.parent / "shared" / "reference"
TOKENIZER_DIR = REFERENCE_DIR / "florence2-tokenizer"

# Skips locally when the files are absent; under CI a skip fails the run (tests/conftest.py).
needs_tokenizer_files = pytest.mark.skipif(
    not (TOKENIZER_DIR / "tokenizer.json").is_file(), reason=f"official tokenizer files absent at {TOKENIZER_DIR}"
)
