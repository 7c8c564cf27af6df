"""The one place where speed strategies are applied to a model for inference (gpt-fast's convert-for-runtime step).

The model's modules each have one plain forward, the same for training and inference on every device.
`prepare_for_inference(model)` turns a loaded model into an inference model: eval mode, parameters frozen, and
each strategy below that pays on this machine swapped in as a subclass of the module it replaces (same parameters,
same state-dict keys, so a prepared model saves and loads like any other). `fiore.load` calls it.

Strategies (CPU, float32; none applies on other devices or dtypes):

- `sliced_vision`: DaViT blocks add their residuals in place and run their per-token parts on slices of tokens
  (stage 0 at 768x768 has 36,864 tokens; whole-map intermediates are fresh pages each time and leave the caches).
- `onednn_one_row` / `onednn_rows`: the decoder's and the LM head's linears call oneDNN for 1-row calls (on the
  weight as it is) and for 2..FEW_ROWS rows (on a copy of the weight in oneDNN's blocked layout, made here):
  decoding streams every weight for a handful of rows, where MKL's sgemm is slow.
- `onednn_narrow`: vision linears with at most NARROW features on a side call oneDNN (MKL is slow on thin products).
- `fused_decoder`: each decoder layer's self-attention q/k/v become one matmul over one weight (the three parameters
  become views of it: no copy is kept) and the layer runs its step in fewer tensor operations.

Decode strategies (any device and dtype; asked for by name, never by "auto" or "all"):

- `static_cache`: `new_cache` returns a `StaticDecoderCache`, whose tensors keep their shapes and addresses from
  step to step (same tokens; on its own it only costs: attention reads the whole buffer).
- `compiled_decode` (implies `static_cache`): the decoder's cached step runs through `torch.compile(fullgraph=True)`,
  with CUDA graphs on a GPU (mode "reduce-overhead"): batch-1 decoding on a GPU is bound by kernel launches, which a
  replayed graph removes. One graph per batch size and encoder length (rows that finish leave the batch: a few
  sizes per call); the cache's tensors are marked static addresses. On the CPU it compiles with inductor (what the
  CPU tests exercise; no speed is claimed there). Not chosen by "auto" until a GPU measurement says it pays
  (`benchmarks/bench_gpu.py`; docs/performance.md): opt in with `strategies="static_cache,compiled_decode"` or
  FIORE_STRATEGIES, which the CLI and the server read too.

Half precision (`dtype=torch.bfloat16` or float16, any device): the model runs in that dtype with the plain modules,
except the LM head, which computes the logits in float32 (`Float32Head`): bf16 logits flip greedy near-ties.

Quantization (`quantize="int8"`, CPU): every `nn.Linear` becomes PyTorch's dynamically quantized linear (int8
weights with one scale per output row, activations quantized per call; fbgemm/oneDNN int8 kernels). It replaces
the linear strategies above (the quantized modules are the linears now); `sliced_vision` still applies. PyTorch
marks `torch.ao`'s eager quantization deprecated in favour of torchao, whose eager int8 path is slower than fp32 on
these CPUs without `torch.compile` (docs/performance.md), so fiore uses PyTorch's own until torchao's is faster.
A quantized model has no float weights to save: `fiore.checkpoint.save_checkpoint` refuses it.

With `strategies="auto"` each is timed against the plain module on this machine, with the model's own weights and
shapes (`calibrate`, well under a second for the base model), and kept only where it is faster; the verdicts are
cached per machine and model shape (`cache_path()`). The measurements behind the choices: docs/performance.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fiore.model import kernels
from fiore.model.cache import DecoderCache, StaticDecoderCache
from fiore.model.davit import ChannelBlock, SpatialBlock, as_nchw, as_nhwc, merge_window_heads, windowed
from fiore.model.florence import FlorenceModel
from fiore.model.kernels import heads_view
from fiore.model.text import DecoderLayer

STRATEGIES = ("sliced_vision", "onednn_one_row", "onednn_rows", "onednn_narrow", "fused_decoder")
DECODE_STRATEGIES = ("static_cache", "compiled_decode")
LINEAR_STRATEGIES = {"onednn_one_row", "onednn_rows", "onednn_narrow", "fused_decoder"}
QUANTIZATIONS = ("int8",)
FEW_ROWS = 32  # at most this many rows is the memory-bound few-row regime (decoder steps: batch x beams)
NARROW = 64  # a linear with at most this many features on one side is "narrow"
SLICE_BYTES = 4 << 20  # sliced vision: activation bytes per slice


# ---------------------------------------------------------------------------------------------- sliced vision


def _rows(x: torch.Tensor, width: int) -> int:
    return max(1, SLICE_BYTES // (width * x.element_size()))


def _ffn_in_place(block, x: torch.Tensor) -> torch.Tensor:
    flat = x.view(-1, x.shape[-1])
    rows = _rows(x, block.ffn.fc1.out_features)
    for r in range(0, flat.shape[0], rows):
        part = flat[r : r + rows]
        part += block.ffn(block.norm2(part))
    return x


class SlicedSpatialBlock(SpatialBlock):
    """`SpatialBlock` for inference: residuals in place; window attention in bands of whole windows, partitioning the
    C-wide input (cheaper than the 3C-wide qkv) and reading q, k, v as strided views; the MLP on row slices."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + as_nhwc(self.conv1(as_nchw(x)))  # a new tensor: the caller's input is never written
        B, H, W, C = x.shape
        ws = self.window_attn.window_size
        band = ws * max(1, _rows(x, 4 * C) // (B * ws * W))  # bands of whole windows are independent
        for r in range(0, H, band):
            part = x[:, r : r + band]
            part += _window_attention(self.window_attn, self.norm1(part))
        x += as_nhwc(self.conv2(as_nchw(x)))
        return _ffn_in_place(self, x)


def _window_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """`attn(x)` partitioning the C-wide input into windows and reading q, k, v as strided views."""

    def attend(x: torch.Tensor) -> torch.Tensor:
        B, Hp, Wp, C = x.shape
        ws = attn.window_size
        x = x.view(B, Hp // ws, ws, Wp // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)
        x = F.scaled_dot_product_attention(*heads_view(attn.qkv(x), attn.num_heads).unbind(0))
        return attn.proj(merge_window_heads(x, B, Hp, Wp, ws))

    return windowed(x, attn.window_size, attend)


class SlicedChannelBlock(ChannelBlock):
    """`ChannelBlock` for inference: residuals in place; channel attention accumulated slice by slice (a group's
    C/G x C/G attention matrix is a sum over tokens); the MLP on row slices."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + as_nhwc(self.conv1(as_nchw(x)))
        B, H, W, C = x.shape
        _channel_attention_in_place(self.channel_attn, self.norm1, x.view(B, H * W, C), _rows(x, 4 * C * B))
        x += as_nhwc(self.conv2(as_nchw(x)))
        return _ffn_in_place(self, x)


def _channel_attention_in_place(attn, norm, x: torch.Tensor, rows: int) -> None:
    """x += attention(norm(x)) on (B, N, C), `rows` tokens at a time."""
    B, N, C = x.shape
    G, d = attn.num_groups, C // attn.num_groups
    scores = x.new_zeros(B, G, d, d)
    values = x.new_empty(B, G, N, d)
    for r in range(0, N, rows):
        qkv = heads_view(attn.qkv(norm(x[:, r : r + rows])), G)  # (3, B, G, n, d)
        scores += qkv[0].transpose(-1, -2) @ qkv[1]
        values[:, :, r : r + rows] = qkv[2]
    weights = (scores * N**-0.5).softmax(-1).transpose(-1, -2)  # (B, G, d_j, d_i)
    for r in range(0, N, rows):
        out = (values[:, :, r : r + rows] @ weights).permute(0, 2, 1, 3).reshape(B, -1, C)
        x[:, r : r + rows] += attn.proj(out)


# ---------------------------------------------------------------------------------------------- oneDNN linears


class OneDNNLinear(nn.Linear):
    """`nn.Linear` calling oneDNN where calibration found it faster: 1-row calls on the weight as it is
    (`one_row`), 2..FEW_ROWS-row calls on a blocked copy made at preparation (`rows`), any call (`narrow`)."""

    one_row: bool = False
    rows: bool = False
    narrow: bool = False
    packed: torch.Tensor | None = None

    def repack(self) -> None:
        """(Re)make the blocked copy from the current weight (preparation and every load_state_dict do)."""
        self.packed = kernels.pack_weight(self.weight, 4) if self.rows else None

    def __getstate__(self):
        # The blocked copy is an opaque oneDNN tensor (not copyable or picklable): a copy makes its own.
        return {**self.__dict__, "packed": None}

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self.repack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        n = x.numel() // k if k else 0
        if n == 0:
            return F.linear(x, self.weight, self.bias)
        if self.narrow or (n == 1 and self.one_row):
            return kernels.onednn_linear(x, self.weight, self.bias, self.out_features)
        if n <= FEW_ROWS and self.packed is not None:
            return kernels.onednn_linear(x, self.packed, self.bias, self.out_features)
        return F.linear(x, self.weight, self.bias)


def use_onednn(layer: nn.Linear, one_row: bool, rows: bool, narrow: bool) -> None:
    layer.__class__ = OneDNNLinear
    layer.one_row, layer.rows, layer.narrow = one_row, rows, narrow
    layer.repack()


# ---------------------------------------------------------------------------------------------- fused decoder


class FusedDecoderLayer(DecoderLayer):
    """`DecoderLayer` for inference: q, k, v of the self-attention from one matmul, and the layer's maths written in
    fewer tensor operations (a decode step's cost is mostly per operation, not per element).

    `fused_qkv` is a (d -> 3d) linear whose weight and bias are one tensor each; the q/k/v parameters become views
    of them, so there is no second copy and load_state_dict writes through to it. It is not a submodule: the state
    dict keeps the checkpoint's q_proj/k_proj/v_proj keys (saved as copies of their own, see `fuse`).
    """

    fused_qkv: nn.Linear

    def fuse(self) -> None:
        attn = self.self_attn
        parts = (attn.q_proj, attn.k_proj, attn.v_proj)
        d = attn.q_proj.in_features
        fused = nn.Linear(d, 3 * d, device="meta")
        with torch.no_grad():
            fused.weight = nn.Parameter(torch.cat([m.weight for m in parts]), requires_grad=False)
            fused.bias = nn.Parameter(torch.cat([m.bias for m in parts]), requires_grad=False)
        for i, m in enumerate(parts):
            m.weight = nn.Parameter(fused.weight[i * d : (i + 1) * d], requires_grad=False)
            m.bias = nn.Parameter(fused.bias[i * d : (i + 1) * d], requires_grad=False)
        self.__dict__["fused_qkv"] = fused
        # The views share memory: a saved state dict gets copies of its own (safetensors refuses shared tensors).
        self.register_state_dict_post_hook(_own_copies_of_views)

    def forward(self, x, encoder_hidden, encoder_mask, cache=None, layer: int = 0):
        B, t, d = x.shape
        attn, cross = self.self_attn, self.encoder_attn
        q, k, v = self.fused_qkv(x).view(B, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        if cache is None:
            h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            ck, cv = cross.kv(encoder_hidden)
        else:
            k, v = cache.update(layer, k, v)
            h = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.causal_mask(t))
            ck, cv = cache.cross_k[layer], cache.cross_v[layer]
        x = self.self_attn_layer_norm(x + attn.out_proj(h.transpose(1, 2).reshape(B, t, d)))
        q = cross.q_proj(x).view(B, t, cross.num_heads, d // cross.num_heads).transpose(1, 2)
        h = F.scaled_dot_product_attention(q, ck, cv, attn_mask=encoder_mask)
        x = self.encoder_attn_layer_norm(x + cross.out_proj(h.transpose(1, 2).reshape(B, t, d)))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


def _own_copies_of_views(module, state_dict, prefix, local_metadata) -> None:
    for name in ("q_proj", "k_proj", "v_proj"):
        for kind in ("weight", "bias"):
            key = f"{prefix}self_attn.{name}.{kind}"
            if key in state_dict:
                state_dict[key] = state_dict[key].clone()


def _repack_decode_linears(model, _incompatible_keys) -> None:
    for layer in _decode_linears(model):
        layer.repack()


# ---------------------------------------------------------------------------------------------- calibration


def _time(fn: Callable[[], object], repeats: int = 5, calls: int = 3) -> float:
    """Median over `repeats` of the time of `calls` calls (after one warm-up call)."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _faster(plain: Callable[[], object], strategy: Callable[[], object], margin: float = 0.97) -> bool:
    """True when `strategy` takes under `margin` of `plain`'s time (interleaved, best of both orders)."""
    a1, b1 = _time(plain), _time(strategy)
    b2, a2 = _time(strategy), _time(plain)
    return min(b1, b2) < margin * min(a1, a2)


def _narrow_linears(model) -> list[nn.Linear]:
    return [m for m in model.vision_tower.modules() if isinstance(m, nn.Linear) and min(m.weight.shape) <= NARROW]


def _decode_linears(model) -> list[nn.Linear]:
    """Every linear a decode step calls with a few rows: the decoder's (a fused layer's q/k/v as its fused linear)
    and the LM head. Cross-attention keys and values are left out: they are projected once, over all encoder
    tokens."""
    linears = []
    for layer in model.language_model.decoder.layers:
        attn, cross = layer.self_attn, layer.encoder_attn
        fused = layer.__dict__.get("fused_qkv")
        qkv = [fused] if fused is not None else [attn.q_proj, attn.k_proj, attn.v_proj]
        linears += [*qkv, attn.out_proj, cross.q_proj, cross.out_proj, layer.fc1, layer.fc2]
    return [*linears, model.lm_head]


def measure(model) -> dict[str, bool]:
    """Time every strategy against the plain module on this machine, with the model's weights and shapes."""
    verdicts = dict.fromkeys(STRATEGIES, False)
    with torch.inference_mode():
        layer = model.language_model.decoder.layers[0]
        fc1 = layer.fc1
        d = fc1.in_features
        if kernels.ONEDNN:
            one = torch.randn(1, d)
            verdicts["onednn_one_row"] = _faster(
                lambda: F.linear(one, fc1.weight, fc1.bias),
                lambda: kernels.onednn_linear(one, fc1.weight, fc1.bias, fc1.out_features),
            )
            four = torch.randn(4, d)
            packed = kernels.pack_weight(fc1.weight, 4)
            verdicts["onednn_rows"] = _faster(
                lambda: F.linear(four, fc1.weight, fc1.bias),
                lambda: kernels.onednn_linear(four, packed, fc1.bias, fc1.out_features),
            )
            narrow = _narrow_linears(model)
            if narrow:
                lin = narrow[0]
                h, w = model.config.image_size
                tokens = torch.randn((h // 4) * (w // 4), lin.in_features)  # stage 0's map
                verdicts["onednn_narrow"] = _faster(
                    lambda: F.linear(tokens, lin.weight, lin.bias),
                    lambda: kernels.onednn_linear(tokens, lin.weight, lin.bias, lin.out_features),
                )
        attn = layer.self_attn
        x = torch.randn(1, 1, d)
        fused_w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        fused_b = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        verdicts["fused_decoder"] = _faster(
            lambda: [m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)],
            lambda: F.linear(x, fused_w, fused_b),
        )
        block = model.vision_tower.blocks[0][0]
        h, w = model.config.image_size
        C = model.vision_tower.convs[0].conv.out_channels
        image = torch.randn(1, h // 4, w // 4, C)
        verdicts["sliced_vision"] = _faster(
            lambda: block.channel_block(block.spatial_block(image)),
            lambda: SlicedChannelBlock.forward(
                block.channel_block, SlicedSpatialBlock.forward(block.spatial_block, image)
            ),
        )
    return verdicts


def cache_path() -> Path:
    """Where calibration verdicts are kept: $FIORE_CACHE_DIR, else ~/.cache/fiore; strategies.json."""
    root = (
        os.environ.get("FIORE_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fiore"
    )
    return Path(root) / "strategies.json"


def _machine() -> str:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}|{os.cpu_count()} cpus|{torch.get_num_threads()} threads|torch {torch.__version__}"


def _shape_key(model) -> str:
    c = model.config
    v, t = c.vision, c.text
    return f"vision {list(v.embed_dims)} image {list(c.image_size)}|text {t.d_model}/{t.decoder_ffn_dim}/{t.vocab_size}"


def calibrate(model, refresh: bool = False) -> dict[str, bool]:
    """The verdicts for this machine and model shape: from the cache, else measured (and cached)."""
    path = cache_path()
    key = f"{_machine()}|{_shape_key(model)}"
    cached: dict = {}
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads(path.read_text())
    if not refresh and isinstance(cached.get(key), dict) and set(cached[key]) == set(STRATEGIES):
        return cached[key]
    verdicts = measure(model)
    cached[key] = verdicts
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=1, sort_keys=True))
        tmp.replace(path)
    return verdicts


# ---------------------------------------------------------------------------------------------- the step


def resolve(strategies: str | Iterable[str] | None, model) -> set[str]:
    """ "auto" (calibrated), "all" (every CPU strategy), "none", or names, comma-separated or a list; None =
    $FIORE_STRATEGIES, else "auto". The CPU strategies apply to CPU float32 models only; "auto" and "all" give
    others none."""
    if strategies is None:
        strategies = os.environ.get("FIORE_STRATEGIES", "auto")
    cpu_float32 = model.device.type == "cpu" and model.dtype == torch.float32
    if isinstance(strategies, str):
        if strategies == "auto":
            return {name for name, use in calibrate(model).items() if use} if cpu_float32 else set()
        if strategies == "all":
            return set(STRATEGIES) if cpu_float32 else set()
        if strategies in ("none", ""):
            return set()
        strategies = [s.strip() for s in strategies.split(",") if s.strip()]
    chosen = set(strategies)
    known = (*STRATEGIES, *DECODE_STRATEGIES)
    unknown = chosen - set(known)
    if unknown:
        raise ValueError(f"unknown inference strategies {sorted(unknown)}; known: {', '.join(known)}")
    if not cpu_float32:
        chosen -= set(STRATEGIES)
    if "compiled_decode" in chosen:
        chosen.add("static_cache")
    return chosen


# ---------------------------------------------------------------------------------------------- decode strategies


class StaticCacheModel(FlorenceModel):
    """`FlorenceModel` whose decoding cache is a `StaticDecoderCache` (strategy `static_cache`), its length rounded
    up to a power of two (at least 64): tasks' token limits differ, and each cache length is another graph to
    compile and capture."""

    @torch.no_grad()
    def new_cache(self, encoder_hidden, encoder_mask, max_length) -> DecoderCache:
        limit = self.config.text.max_position_embeddings
        if 0 < max_length <= limit:
            max_length = min(limit, max(64, 1 << (max_length - 1).bit_length()))
        return StaticDecoderCache.like(super().new_cache(encoder_hidden, encoder_mask, max_length))


class CompiledDecodeModel(StaticCacheModel):
    """`StaticCacheModel` whose cached decoder step is compiled (strategy `compiled_decode`; `compile_decode`)."""

    compiled_step: Callable

    def cached_step(self, decoder_input_ids, cache):
        for tensor in cache.tensors():  # rows leaving the batch make new tensors: mark each as it comes
            torch._dynamo.mark_static_address(tensor)
        # A copy with strides of its own: the ids arrive as a column of the generation buffer, whose strides depend on
        # the token limit, and a compiled graph is specialised on strides too.
        ids = decoder_input_ids.clone(memory_format=torch.contiguous_format)
        return self.compiled_step(ids, None, cache.attention_mask, cache)


def compile_decode(model, backend: str | Callable = "inductor", mode: str | None = None) -> None:
    """Swap in `CompiledDecodeModel` with the decoder compiled by `torch.compile(fullgraph=True)`: a graph break
    would put Python back between the kernels, which is what compiling is for. `mode` defaults to "reduce-overhead"
    (CUDA graphs) on a GPU and inductor's default elsewhere; tests pass a counting `backend`."""
    if mode is None and backend == "inductor" and model.device.type == "cuda":
        mode = "reduce-overhead"
    model.__class__ = CompiledDecodeModel
    # In the instance dict: a compiled module registered as a submodule would add its keys to the state dict.
    model.__dict__["compiled_step"] = torch.compile(
        model.language_model.decoder, backend=backend, mode=mode, fullgraph=True
    )


class Float32Head(nn.Linear):
    """The LM head of a half-precision model, computed in float32 from a float32 copy of its (tied) weight, kept
    as a non-persistent buffer: the state dict is unchanged. Greedy decoding picks among near-tied logits, and bf16
    logits (8 significant bits) flip those ties (docs/performance.md: bf16 on the CPU)."""

    def keep_float32_copy(self) -> None:
        self.register_buffer("weight_float32", self.weight.detach().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight_float32)


def check_quantize(quantize: str | None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Refuse a quantization fiore does not offer, or one asked for off the CPU or from non-float32 weights, before
    any weights are read."""
    if quantize is None:
        return
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantize!r}; known: {', '.join(QUANTIZATIONS)}")
    if torch.device(device).type != "cpu" or dtype != torch.float32:
        raise ValueError(
            f"quantize={quantize!r} runs on the CPU from float32 weights (asked: {torch.device(device)}, {dtype}); "
            "on a GPU use dtype=torch.bfloat16 instead"
        )


def quantize_int8(model) -> None:
    """Every `nn.Linear` -> PyTorch's dynamically quantized int8 linear, in place (see the module docstring)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch.ao's deprecation notice, said once in the docs instead of every load
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_(tensor|channel).*")
        # One scale per output row: the tied LM head's rows (token embeddings) differ widely in norm, and one scale
        # for the whole matrix cost the shipped model 9 CIDEr points (docs/performance.md); per row costs no time.
        quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)


def prepare_for_inference(model, strategies: str | Iterable[str] | None = None, quantize: str | None = None):
    """Eval mode, parameters frozen, `quantize` ("int8" or None) applied and the chosen strategies swapped in (see the
    module docstring). Returns `model`, whose `inference_strategies` lists the strategies applied and `quantized` the
    quantization (or None). Prepare a model once its weights are loaded."""
    check_quantize(quantize, model.device, model.dtype)
    model.eval().requires_grad_(False)
    chosen = resolve(strategies, model)
    if quantize and "compiled_decode" in chosen:
        # torch.compile cannot trace PyTorch's int8 linears (their packed weights are TorchScript objects).
        raise ValueError(f"compiled_decode does not compile a quantize={quantize!r} model; leave one of them out")
    if not kernels.ONEDNN:
        chosen -= {"onednn_one_row", "onednn_rows", "onednn_narrow"}
    model.quantized = quantize
    if model.dtype in (torch.bfloat16, torch.float16):
        model.lm_head.__class__ = Float32Head
        model.lm_head.keep_float32_copy()
    if quantize == "int8":
        chosen -= LINEAR_STRATEGIES
        quantize_int8(model)
    if "sliced_vision" in chosen:
        for stage in model.vision_tower.blocks:
            for block in stage:
                block.spatial_block.__class__ = SlicedSpatialBlock
                block.channel_block.__class__ = SlicedChannelBlock
    if "onednn_narrow" in chosen:
        for layer in _narrow_linears(model):
            use_onednn(layer, one_row=False, rows=False, narrow=True)
    if "fused_decoder" in chosen:
        for layer in model.language_model.decoder.layers:
            layer.__class__ = FusedDecoderLayer
            layer.fuse()
    if chosen & {"onednn_one_row", "onednn_rows"}:
        for layer in _decode_linears(model):
            use_onednn(layer, "onednn_one_row" in chosen, "onednn_rows" in chosen, narrow=False)
    if "onednn_rows" in chosen:  # blocked copies follow weights loaded later (fused linears are no submodules)
        model.register_load_state_dict_post_hook(_repack_decode_linears)
    if "compiled_decode" in chosen:
        compile_decode(model)
    elif "static_cache" in chosen:
        model.__class__ = StaticCacheModel
    model.inference_strategies = tuple(s for s in (*STRATEGIES, *DECODE_STRATEGIES) if s in chosen)
    return model
