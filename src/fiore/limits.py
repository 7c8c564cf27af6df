"""Input limits shared by the Python API, the command line and the server (each can be raised per call)."""

# Images with more pixels are refused before decoding (read from the header): ~8000x8000, far above any model
# input, and a guard against decompression bombs. `max_pixels=` in the API, `--max-pixels` on predict / label / serve.
DEFAULT_MAX_PIXELS = 64_000_000
