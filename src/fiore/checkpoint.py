"""Load and save checkpoints: Microsoft's original Florence-2 layout and transformers' native one.

Loading reads a local directory (config.json + `model.safetensors` [sharded with an index] or `pytorch_model.bin`),
maps original keys onto native ones with the regex table below, and loads strictly: one `CheckpointError` names
every missing, unexpected or mis-shaped key. Saving writes a transformers-native directory (config.json with fiore's
own config under `fiore_config`, plus model.safetensors) that `Florence2ForConditionalGeneration` can load.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from fiore.config import ModelConfig, TextConfig, VisionConfig
from fiore.files import save_tensors
from fiore.model.florence import SHARED_KEY, TIED_KEYS, FlorenceModel

# fiore's image-text heads (`FlorenceModel.contrastive`), stored beside the Florence-2 weights, unprefixed.
CONTRASTIVE_FILE = "contrastive.safetensors"
CONTRASTIVE_PREFIX = "contrastive."


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read or does not match the model it describes."""


# Original (Microsoft remote code) key -> native key. Applied in order, each rule to every key (re.sub).
ORIGINAL_TO_NATIVE: list[tuple[str, str]] = [
    (r"^vision_tower\.convs\.(\d+)\.proj\.", r"vision_tower.convs.\1.conv."),
    (r"\.conv([12])\.fn\.dw\.", r".conv\1."),
    (r"\.(window_attn|channel_attn)\.norm\.", r".norm1."),
    (r"\.(window_attn|channel_attn)\.fn\.", r".\1."),
    (r"\.ffn\.norm\.", r".norm2."),
    (r"\.ffn\.fn\.net\.", r".ffn."),
    (r"^vision_tower\.", r"model.vision_tower."),
    (r"^image_projection$", r"model.multi_modal_projector.image_projection.weight"),
    (r"^image_proj_norm\.", r"model.multi_modal_projector.image_proj_norm."),
    (r"^image_pos_embed\.", r"model.multi_modal_projector.image_position_embed."),
    (r"^visual_temporal_embed\.", r"model.multi_modal_projector.visual_temporal_embed."),
    (r"^language_model\.model\.", r"model.language_model."),
    (r"^language_model\.lm_head\.", r"lm_head."),
]
# The original stores the projection as a raw (C_vision, d) Parameter; native as a Linear weight (d, C_vision).
_TRANSPOSED = "model.multi_modal_projector.image_projection.weight"
_FINAL_LOGITS_BIAS = "language_model.final_logits_bias"

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "preprocessor_config.json",
    "processor_config.json",
)

# transformers' BartConfig defaults, for keys a native text_config leaves out.
_BART_DEFAULTS = dict(
    vocab_size=50265,
    d_model=1024,
    encoder_layers=12,
    decoder_layers=12,
    encoder_attention_heads=16,
    decoder_attention_heads=16,
    encoder_ffn_dim=4096,
    decoder_ffn_dim=4096,
    max_position_embeddings=1024,
    dropout=0.1,
    attention_dropout=0.0,
    activation_dropout=0.0,
    activation_function="gelu",
    scale_embedding=False,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=2,
)


# -- reading --------------------------------------------------------------------------------------------------------


def is_original_format(keys) -> bool:
    return any(k.startswith(("vision_tower.", "language_model.model.", "image_projection")) for k in keys)


def original_to_native(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename Microsoft's original keys to native ones; transpose the projection; drop `final_logits_bias`."""
    out = {}
    for key, tensor in state_dict.items():
        if key == _FINAL_LOGITS_BIAS:
            if torch.any(tensor != 0):
                warnings.warn(
                    "checkpoint has a non-zero final_logits_bias; it is dropped (the native model has none)",
                    stacklevel=3,
                )
            continue
        new = key
        for pattern, repl in ORIGINAL_TO_NATIVE:
            new = re.sub(pattern, repl, new)
        if new == _TRANSPOSED and tensor.ndim == 2:
            tensor = tensor.t().contiguous()
        out[new] = tensor
    return out


def _read_file(f: Path, loader=load_file):
    """One weight file through `loader`, a CheckpointError naming the file when it is empty, truncated or garbled."""
    if f.stat().st_size == 0:
        raise CheckpointError(f"{f} is empty (0 bytes)")
    try:
        return loader(str(f))
    except CheckpointError:
        raise
    except Exception as e:  # safetensors and torch.load raise several types for truncated or garbled files
        raise CheckpointError(f"{f} is corrupt or truncated: {type(e).__name__}: {e}") from None


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    def shards(index_file: Path) -> list[Path]:
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index_file}: not a weight index (JSON with a weight_map): {e}") from None
        return [directory / name for name in sorted(set(weight_map.values()))]

    def load_bin(f: Path) -> dict[str, torch.Tensor]:
        # weights_only=True: never unpickle arbitrary objects from a checkpoint file.
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{f} holds more than tensors; refusing to unpickle it ({e})") from e

    if (directory / "model.safetensors.index.json").exists():
        files, loader = shards(directory / "model.safetensors.index.json"), load_file
    elif (directory / "model.safetensors").exists():
        files, loader = [directory / "model.safetensors"], load_file
    elif (directory / "pytorch_model.bin.index.json").exists():
        files, loader = shards(directory / "pytorch_model.bin.index.json"), load_bin
    elif (directory / "pytorch_model.bin").exists():
        files, loader = [directory / "pytorch_model.bin"], load_bin
    else:
        raise CheckpointError(
            f"no weights in {directory}: expected model.safetensors, model.safetensors.index.json, "
            "pytorch_model.bin or pytorch_model.bin.index.json"
        )
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.exists():
            raise CheckpointError(f"weight shard {f} listed in the index is missing")
        part = _read_file(f, loader)
        if not isinstance(part, dict):
            raise CheckpointError(f"{f} does not hold a state dict")
        tensors.update(part)
    return tensors


def _image_size(directory: Path) -> tuple[int, int]:
    """(height, width) from the processor's preprocessor_config.json, else Florence-2's 768x768."""
    pre = directory / "preprocessor_config.json"
    if pre.exists():
        size = json.loads(pre.read_text()).get("size") or {}
        if isinstance(size, dict) and "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
    return 768, 768


def _text_config(tc: dict) -> TextConfig:
    if tc.get("normalize_before") or tc.get("add_final_layer_norm"):
        raise CheckpointError("pre-LN text models (normalize_before / add_final_layer_norm) are not supported")
    return TextConfig(**{k: tc.get(k, default) for k, default in _BART_DEFAULTS.items()})


# VisionConfig field -> its key in vision_config of (transformers' native, Microsoft's original) config.json: the one
# place both layouts' names are written (read here, written by `native_config` and `fiore.convert`).
VISION_KEYS: dict[str, tuple[str, str]] = {
    "in_chans": ("in_channels", "in_chans"),
    "embed_dims": ("embed_dim", "dim_embed"),
    **{
        name: (name, name)
        for name in (
            "depths", "num_heads", "num_groups", "patch_size", "patch_stride", "patch_padding", "patch_prenorm",
            "window_size", "mlp_ratio", "qkv_bias", "drop_path_rate", "projection_dim",
        )
    },
}  # fmt: skip


def vision_fields(v: VisionConfig, original: bool) -> dict:
    """The VISION_KEYS fields of `v` under one layout's keys (sequences as lists, as JSON has them)."""
    out = {}
    for field, keys in VISION_KEYS.items():
        value = getattr(v, field)
        out[keys[original]] = list(value) if isinstance(value, tuple) else value
    return out


def _vision_config(vc: dict, original: bool, projection_dim: int | None) -> VisionConfig:
    d = VisionConfig()
    if vc.get("activation_function", "gelu") != "gelu":
        raise CheckpointError(f"unsupported vision activation_function {vc['activation_function']!r}")
    if original:
        pos = vc.get("image_pos_embed") or {}
        temporal = vc.get("visual_temporal_embedding") or {}
        if pos.get("type", "learned_abs_2d") != "learned_abs_2d" or temporal.get("type", "COSINE") != "COSINE":
            raise CheckpointError(f"unsupported image position embeddings: {pos}, {temporal}")
        sources = vc.get("image_feature_source", ["spatial_avg_pool", "temporal_avg_pool"])
        if list(sources) != ["spatial_avg_pool", "temporal_avg_pool"]:
            raise CheckpointError(f"unsupported image_feature_source {sources}")
        max_pos = pos.get("max_pos_embeddings", d.max_position_embeddings)
        max_temporal = temporal.get("max_temporal_embeddings", d.max_temporal_embeddings)
    else:
        max_pos = vc.get("max_position_embeddings", d.max_position_embeddings)
        max_temporal = vc.get("max_temporal_embeddings", d.max_temporal_embeddings)
    fields = {}
    for field, keys in VISION_KEYS.items():
        default = getattr(d, field)
        if field == "projection_dim":
            default = projection_dim or default
        value = vc.get(keys[original], default)
        fields[field] = tuple(value) if isinstance(default, tuple) else value
    return VisionConfig(**fields, max_position_embeddings=max_pos, max_temporal_embeddings=max_temporal)


def read_config(directory: str | Path) -> ModelConfig:
    """ModelConfig from a checkpoint's config.json: fiore's own `fiore_config` if present, else either flavour."""
    directory = Path(directory)
    path = directory / "config.json"
    if not path.exists():
        raise CheckpointError(f"{directory} has no config.json")
    raw = json.loads(path.read_text())
    if "fiore_config" in raw:
        return ModelConfig.from_dict(raw["fiore_config"])
    if "vision_config" not in raw or "text_config" not in raw:
        raise CheckpointError(f"{path} is not a Florence-2 config (needs vision_config and text_config)")
    vc, tc = raw["vision_config"], raw["text_config"]
    original = "dim_embed" in vc or vc.get("model_type") == "davit"
    vision = _vision_config(vc, original, raw.get("projection_dim"))
    text = _text_config(tc)
    image_token_id = None if original else raw.get("image_token_id", 51289)
    return ModelConfig(vision=vision, text=text, image_size=_image_size(directory), image_token_id=image_token_id)


def _canonical_tied(state_dict: dict[str, torch.Tensor]) -> None:
    """Keep the shared token embedding once, under SHARED_KEY; its tied aliases must agree with it."""
    present = [k for k in (SHARED_KEY, *TIED_KEYS) if k in state_dict]
    if not present:
        return
    canonical = state_dict[present[0]]
    for key in present[1:]:
        alias = state_dict.pop(key)
        if alias.shape != canonical.shape or not torch.equal(alias, canonical):
            raise CheckpointError(
                f"{key} {tuple(alias.shape)} is not tied to {present[0]} {tuple(canonical.shape)}; "
                "fiore ties the LM head and token embeddings"
            )
    state_dict[SHARED_KEY] = canonical


def load_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a checkpoint directory -> (config, state dict with native keys and the tied embedding once)."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist or is not a directory")
    config = read_config(directory)
    state_dict = _read_tensors(directory)
    if is_original_format(state_dict):
        state_dict = original_to_native(state_dict)
    _canonical_tied(state_dict)
    heads = directory / CONTRASTIVE_FILE
    if heads.exists():
        state_dict.update({CONTRASTIVE_PREFIX + k: v for k, v in _read_file(heads).items()})
    return config, state_dict


def check_state_dict(expected: dict[str, torch.Size], state_dict: dict[str, torch.Tensor], source: str = "") -> None:
    """Raise one CheckpointError naming every missing, unexpected and mis-shaped key."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k])
    )
    if missing or unexpected or misshaped:
        parts = [f"checkpoint{' ' + source if source else ''} does not match the model config:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                parts.append(f"{len(items)} {title} key(s):\n  " + "\n  ".join(items))
        raise CheckpointError("\n".join(parts))


def build_model(
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    source: str = "",
) -> FlorenceModel:
    """A FlorenceModel holding exactly `state_dict` (strict), on `device` in `dtype`, in eval mode."""
    with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
        model = FlorenceModel(config)
    check_state_dict(expected_shapes(model), state_dict, source)
    model.load_state_dict(with_tied(state_dict), strict=True, assign=True)
    model.tie_weights()  # assign=True gave lm_head its own Parameter object
    model.to(device=device, dtype=dtype)
    model.tie_weights()
    return model.eval()


def expected_shapes(model: FlorenceModel) -> dict[str, torch.Size]:
    """The state-dict keys and shapes a checkpoint must hold for `model` (the tied embedding once)."""
    return {k: v.shape for k, v in model.state_dict().items() if k not in TIED_KEYS}


def with_tied(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict with the tied embedding's aliases filled in, as `load_state_dict` wants it."""
    return {**state_dict, **{key: state_dict[SHARED_KEY] for key in TIED_KEYS}}


def load_weights(model: FlorenceModel, state_dict: dict[str, torch.Tensor], source: str = "") -> None:
    """Copy a checkpoint's state dict (from `load_checkpoint`) into a live model's parameters, strictly: every key
    present, none extra, every shape equal (one CheckpointError naming them all otherwise)."""
    check_state_dict(expected_shapes(model), state_dict, source)
    model.load_state_dict(with_tied(state_dict), strict=True)


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[FlorenceModel, ModelConfig]:
    config, state_dict = load_checkpoint(path)
    return build_model(config, state_dict, device, dtype, source=str(path)), config


# -- writing --------------------------------------------------------------------------------------------------------


def native_config(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """config.json content in transformers' Florence2 layout, with fiore's own config under `fiore_config`."""
    v, t = config.vision, config.text
    text_config = {
        "model_type": "bart",
        **{k: getattr(t, k) for k in _BART_DEFAULTS},
        "forced_eos_token_id": t.eos_token_id,
        "is_encoder_decoder": True,
        "tie_word_embeddings": True,
    }
    vision_config = {
        "model_type": "florence_vision",
        **vision_fields(v, original=False),
        "activation_function": "gelu",
        "max_temporal_embeddings": v.max_temporal_embeddings,
        "max_position_embeddings": v.max_position_embeddings,
    }
    return {
        "architectures": ["Florence2ForConditionalGeneration"],
        "model_type": "florence2",
        # transformers needs some id here; fiore never uses it (image tokens are prepended, not scattered).
        "image_token_id": config.image_token_id if config.image_token_id is not None else 51289,
        "is_encoder_decoder": True,
        "tie_word_embeddings": True,
        "dtype": str(dtype).removeprefix("torch."),
        "text_config": text_config,
        "vision_config": vision_config,
        "fiore_config": config.to_dict(),
    }


def save_checkpoint(model: FlorenceModel, config: ModelConfig, path: str | Path, tokenizer=None) -> Path:
    """Write config.json + model.safetensors (+ the tokenizer's files via `tokenizer.save(path)`) to `path`.
    A quantized model is refused before anything is written: its int8 linears are no Florence-2 weights."""
    if model.quantized is not None:
        raise CheckpointError(
            f"this model was loaded with quantize={model.quantized!r}: its linears hold {model.quantized} weights, "
            f"which a Florence-2 checkpoint cannot store; nothing was written to {path}. Save the float model "
            "(load it without quantize) and quantize again when loading it."
        )
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    # Tied aliases are stored once (as transformers does): safetensors refuses tensors that share memory.
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in TIED_KEYS}
    # The image-text heads are fiore's own: a file of their own keeps model.safetensors exactly what
    # transformers' Florence2 expects (it loads that file alone and never sees them).
    heads = {
        k.removeprefix(CONTRASTIVE_PREFIX): state_dict.pop(k)
        for k in list(state_dict)
        if k.startswith(CONTRASTIVE_PREFIX)
    }
    save_tensors(state_dict, directory / "model.safetensors", metadata={"format": "pt"})
    if heads:
        save_tensors(heads, directory / CONTRASTIVE_FILE, metadata={"format": "pt"})
    else:
        (directory / CONTRASTIVE_FILE).unlink(missing_ok=True)
    (directory / "config.json").write_text(json.dumps(native_config(config, model.dtype), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def has_tokenizer_files(directory: str | Path) -> bool:
    return (Path(directory) / "tokenizer.json").exists() or (
        (Path(directory) / "vocab.json").exists() and (Path(directory) / "merges.txt").exists()
    )


def tokenizer_files(directory: str | Path) -> list[Path]:
    """The tokenizer/processor files present in `directory` (copied along when a model is re-saved)."""
    return [Path(directory) / n for n in _TOKENIZER_FILES if (Path(directory) / n).exists()]
