"""`fiore convert`: rewrite a checkpoint directory in transformers' native layout or in Microsoft's original one.

Reading either layout is `fiore.checkpoint.load_checkpoint` (original keys mapped by its regex table); writing
native is `fiore.checkpoint.save_checkpoint`. Writing original runs that table backwards (`NATIVE_TO_ORIGINAL`),
transposes the image projection back, restores `final_logits_bias` (zeros) and the tied aliases, and writes an
original-style config.json (`dim_embed`, `image_pos_embed`, ...) plus preprocessor_config.json for the input size.
The original layout needs Microsoft's remote code (`trust_remote_code`) to load in transformers; fiore reads it.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import torch

from fiore.checkpoint import (
    _BART_DEFAULTS,
    CONTRASTIVE_PREFIX,
    ORIGINAL_TO_NATIVE,
    load_checkpoint,
    save_checkpoint,
    tokenizer_files,
    vision_fields,
)
from fiore.config import ModelConfig
from fiore.files import save_tensors

# Native key -> original key: ORIGINAL_TO_NATIVE read backwards (rules in reverse order, each one inverted).
NATIVE_TO_ORIGINAL: list[tuple[str, str]] = [
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.language_model\.", "language_model.model."),
    (r"^model\.multi_modal_projector\.visual_temporal_embed\.", "visual_temporal_embed."),
    (r"^model\.multi_modal_projector\.image_position_embed\.", "image_pos_embed."),
    (r"^model\.multi_modal_projector\.image_proj_norm\.", "image_proj_norm."),
    (r"^model\.multi_modal_projector\.image_projection\.weight$", "image_projection"),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"\.ffn\.(fc[12])\.", r".ffn.fn.net.\1."),
    (r"\.(spatial_block|channel_block)\.norm2\.", r".\1.ffn.norm."),
    (r"\.(window_attn|channel_attn)\.(qkv|proj)\.", r".\1.fn.\2."),
    (r"\.spatial_block\.norm1\.", ".spatial_block.window_attn.norm."),
    (r"\.channel_block\.norm1\.", ".channel_block.channel_attn.norm."),
    (r"\.conv([12])\.(weight|bias)$", r".conv\1.fn.dw.\2"),
    (r"^vision_tower\.convs\.(\d+)\.conv\.", r"vision_tower.convs.\1.proj."),
]
assert len(NATIVE_TO_ORIGINAL) > len(ORIGINAL_TO_NATIVE)  # norm1 splits into two rules: spatial vs channel
_SHARED = "language_model.model.shared.weight"
_ALIASES = (
    "language_model.model.encoder.embed_tokens.weight",
    "language_model.model.decoder.embed_tokens.weight",
    "language_model.lm_head.weight",
)


def native_to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native keys (shared embedding stored once) -> the original remote code's full state dict."""
    out = {}
    for key, tensor in state_dict.items():
        new = key
        for pattern, repl in NATIVE_TO_ORIGINAL:
            new = re.sub(pattern, repl, new)
        if new == "image_projection":
            tensor = tensor.t()
        out[new] = tensor.contiguous()
    if _SHARED in out:
        for alias in _ALIASES:  # safetensors refuses shared storage: each alias is its own copy
            out.setdefault(alias, out[_SHARED].clone())
        out["language_model.final_logits_bias"] = torch.zeros(1, out[_SHARED].shape[0], dtype=out[_SHARED].dtype)
    return out


def original_config(config: ModelConfig) -> dict:
    """config.json in the layout of Microsoft's original Florence-2 checkpoints."""
    v, t = config.vision, config.text
    text = {"model_type": "florence2_language", **{k: getattr(t, k) for k in _BART_DEFAULTS}}
    text.update(normalize_before=False, add_final_layer_norm=False, is_encoder_decoder=True, forced_bos_token_id=0)
    text["forced_eos_token_id"] = t.eos_token_id
    vision = {
        "model_type": "davit",
        **vision_fields(v, original=True),
        "enable_checkpoint": False,
        "image_pos_embed": {"type": "learned_abs_2d", "max_pos_embeddings": v.max_position_embeddings},
        "visual_temporal_embedding": {"type": "COSINE", "max_temporal_embeddings": v.max_temporal_embeddings},
        "image_feature_source": ["spatial_avg_pool", "temporal_avg_pool"],
    }
    return {
        "architectures": ["Florence2ForConditionalGeneration"],
        "model_type": "florence2",
        "is_encoder_decoder": True,
        "projection_dim": v.projection_dim,
        "vocab_size": t.vocab_size,
        "pad_token_id": t.pad_token_id,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id,
        "vision_config": vision,
        "text_config": text,
    }


def convert(src: str | Path, dst: str | Path, to: str = "native") -> Path:
    """Read checkpoint `src` (either layout) and write it to `dst` in layout `to` ("native" or "original"),
    tokenizer/processor files copied along. Returns `dst`."""
    if to not in ("native", "original"):
        raise ValueError(f"unknown checkpoint format {to!r}; use native or original")
    src, dst = Path(src), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        if dst.resolve() == src.resolve():
            raise ValueError(f"{dst} is the source; write the converted checkpoint somewhere else")
        raise FileExistsError(f"{dst} exists and is not empty")
    config, state_dict = load_checkpoint(src)
    dst.mkdir(parents=True, exist_ok=True)
    if to == "native":
        from fiore.checkpoint import build_model

        save_checkpoint(build_model(config, state_dict, source=str(src)), config, dst)
    else:
        heads = [k for k in state_dict if k.startswith(CONTRASTIVE_PREFIX)]
        if heads:  # the original config has no field for them, and Microsoft's code no module
            warnings.warn(
                f"{src}: the image-text heads ({len(heads)} tensors) are not part of the original layout; "
                "they are left out (convert to native to keep them)",
                stacklevel=2,
            )
            state_dict = {k: v for k, v in state_dict.items() if k not in heads}
        save_tensors(native_to_original(state_dict), dst / "model.safetensors", metadata={"format": "pt"})
        (dst / "config.json").write_text(json.dumps(original_config(config), indent=2) + "\n")
    for f in tokenizer_files(src):
        if f.name != "config.json":
            shutil.copy2(f, dst / f.name)
    pre = dst / "preprocessor_config.json"
    H, W = config.image_size
    meta = json.loads(pre.read_text()) if pre.exists() else {}
    if meta.get("size") != {"height": H, "width": W}:  # the input size travels in the processor config
        meta.setdefault("do_resize", True)
        meta["size"] = {"height": H, "width": W}
        pre.write_text(json.dumps(meta, indent=2) + "\n")
    return dst
