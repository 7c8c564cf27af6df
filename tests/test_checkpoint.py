"""Checkpoint formats: native and Microsoft-original keys, .bin / safetensors / sharded, strict errors, saving that
transformers loads back, tokenizer files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from florence_oracle import NATIVE_VOCAB, hf_inputs, hf_model, native_to_original, original_config, prompt_ids
from reference_files import TOKENIZER_DIR, needs_tokenizer_files
from safetensors.torch import load_file, save_file

import fiore
from fiore.checkpoint import CheckpointError, load_checkpoint
from fiore.config import preset
from fiore.florence import Florence
from fiore.model import SHARED_KEY, FlorenceModel

transformers = pytest.importorskip("transformers", reason="transformers is the numerical oracle (dev extra)")

CONFIG = preset("tiny").replace(text={"vocab_size": NATIVE_VOCAB})


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """(transformers model, its save_pretrained directory)."""
    hf = hf_model(CONFIG, seed=11)
    path = tmp_path_factory.mktemp("native")
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(0)
    return torch.randn(2, 3, 128, 128), prompt_ids(2, 7, NATIVE_VOCAB), prompt_ids(2, 5, NATIVE_VOCAB, seed=2)


@pytest.fixture(scope="module")
def reference(native, inputs):
    """Logits of the native checkpoint loaded by fiore: every other format must give exactly these."""
    with torch.no_grad():
        return fiore.load(native[1]).model(*inputs)


def logits_of(path, inputs) -> torch.Tensor:
    with torch.no_grad():
        return fiore.load(path).model(*inputs)


def write_original(native_dir: Path, out: Path, fmt: str) -> Path:
    out.mkdir()
    sd = load_file(native_dir / "model.safetensors")
    sd = {k: v.clone() for k, v in sd.items()}
    shared = sd[SHARED_KEY]
    for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):  # the original stores them all
        sd[f"model.language_model.{alias}"] = shared.clone()
    sd["lm_head.weight"] = shared.clone()
    original = native_to_original(sd)
    assert any(k.startswith("vision_tower.blocks.0.0.spatial_block.window_attn.fn.") for k in original)
    (out / "config.json").write_text(json.dumps(original_config(CONFIG)))
    if fmt == "bin":
        torch.save({k: v.half() for k, v in original.items()}, out / "pytorch_model.bin")  # released as fp16
    else:
        save_file(original, str(out / "model.safetensors"))
    return out


def test_native_state_dict_keys_are_the_models_own(native):
    hf, _ = native
    assert set(FlorenceModel(CONFIG).state_dict()) == set(hf.state_dict())


def test_original_format_bin_fp16(native, inputs, reference, tmp_path):
    path = write_original(native[1], tmp_path / "orig", "bin")
    florence = fiore.load(path)
    assert florence.config.image_token_id is None and florence.config.vision.window_size == 8
    assert florence.model.dtype == torch.float32
    with torch.no_grad():
        logits = florence.model(*inputs)
    # Stored in fp16, so equal to the fp32 reference only up to weight rounding; the same fp16 weights loaded
    # through the native path must match exactly.
    assert (logits - reference).abs().max() < 0.05
    native_fp16 = tmp_path / "native_fp16"
    native_fp16.mkdir()
    (native_fp16 / "config.json").write_text((native[1] / "config.json").read_text())
    save_file(
        {k: v.half() for k, v in load_file(native[1] / "model.safetensors").items()}, native_fp16 / "model.safetensors"
    )
    assert torch.equal(logits, logits_of(native_fp16, inputs))


def test_original_format_safetensors(native, inputs, reference, tmp_path):
    path = write_original(native[1], tmp_path / "orig", "safetensors")
    assert torch.equal(logits_of(path, inputs), reference)


def write_sharded(sd: dict, out: Path, fmt: str, config_json: str) -> list[Path]:
    """`sd` in two shards plus the index file transformers writes (model.safetensors.index.json or
    pytorch_model.bin.index.json); returns the shard paths."""
    keys = sorted(sd)
    half = len(keys) // 2
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    shards = {f"{stem}-00001-of-00002.{ext}": keys[:half], f"{stem}-00002-of-00002.{ext}": keys[half:]}
    out.mkdir(parents=True, exist_ok=True)
    for name, ks in shards.items():
        if fmt == "safetensors":
            save_file({k: sd[k] for k in ks}, str(out / name))
        else:
            torch.save({k: sd[k] for k in ks}, out / name)
    index = {"metadata": {"total_size": 0}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (out / f"{stem}.{ext}.index.json").write_text(json.dumps(index))
    (out / "config.json").write_text(config_json)
    return [out / name for name in shards]


def test_sharded_safetensors_with_index(native, inputs, reference, tmp_path):
    sd = load_file(native[1] / "model.safetensors")
    write_sharded(sd, tmp_path, "safetensors", (native[1] / "config.json").read_text())
    assert torch.equal(logits_of(tmp_path, inputs), reference)


def test_sharded_bin_with_index_in_the_original_key_layout(native, inputs, reference, tmp_path):
    original = write_original(native[1], tmp_path / "orig", "safetensors")
    sd = load_file(original / "model.safetensors")
    write_sharded(sd, tmp_path / "sharded", "bin", (original / "config.json").read_text())
    assert torch.equal(logits_of(tmp_path / "sharded", inputs), reference)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_a_missing_shard_is_named(native, tmp_path, fmt):
    shards = write_sharded(load_file(native[1] / "model.safetensors"), tmp_path, fmt,
                           (native[1] / "config.json").read_text())  # fmt: skip
    shards[1].unlink()
    with pytest.raises(
        CheckpointError, match=f"weight shard {re.escape(str(shards[1]))} listed in the index is missing"
    ):
        fiore.load(tmp_path)


def test_strict_loading_names_every_bad_key(native, tmp_path):
    sd = load_file(native[1] / "model.safetensors")
    del sd["model.vision_tower.convs.0.norm.bias"]
    sd["model.vision_tower.extra.weight"] = torch.zeros(3)
    sd["model.language_model.encoder.layers.1.fc1.weight"] = torch.zeros(7, 7)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((native[1] / "config.json").read_text())
    with pytest.raises(CheckpointError) as err:
        fiore.load(tmp_path)
    msg = str(err.value)
    assert "missing" in msg and "model.vision_tower.convs.0.norm.bias" in msg
    assert "unexpected" in msg and "model.vision_tower.extra.weight" in msg
    assert "mis-shaped" in msg and "model.language_model.encoder.layers.1.fc1.weight: checkpoint (7, 7)" in msg


def test_untied_lm_head_is_rejected(native, tmp_path):
    sd = load_file(native[1] / "model.safetensors")
    sd["lm_head.weight"] = sd[SHARED_KEY] + 1
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((native[1] / "config.json").read_text())
    with pytest.raises(CheckpointError, match="lm_head.weight .* not tied"):
        load_checkpoint(tmp_path)


def test_bin_with_pickled_objects_is_refused(native, tmp_path):
    torch.save({"weights": Path("not a tensor")}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((native[1] / "config.json").read_text())
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "no config.json"),
        (lambda p: (p / "config.json").write_text("{}"), "not a Florence-2 config"),
        (lambda p: (p / "config.json").write_text(json.dumps(original_config(CONFIG))), "no weights"),
    ],
)
def test_unreadable_directories_raise_clear_errors(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        fiore.load(tmp_path)


def test_missing_directory_and_default_model(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="does not exist"):
        fiore.load(tmp_path / "nope")
    monkeypatch.setattr("fiore.florence.default_model_dir", lambda: tmp_path / "default_model")
    with pytest.raises(CheckpointError, match="no default model is shipped"):
        fiore.load()


def test_save_round_trips_through_transformers_and_fiore(native, inputs, reference, tmp_path):
    florence = fiore.load(native[1])
    florence.save(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["vision_config"]["window_size"] == 8 and saved["fiore_config"]["vision"]["window_size"] == 8
    again = fiore.load(tmp_path / "saved")
    assert again.config == florence.config
    assert torch.equal(logits_of(tmp_path / "saved", inputs), reference)

    hf = transformers.Florence2ForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
    pixel_values, prompt, dec = inputs
    ids, mask = hf_inputs(prompt, 1 + 4 * 4)
    with torch.no_grad():
        out = hf(input_ids=ids, pixel_values=pixel_values, attention_mask=mask, decoder_input_ids=dec)
    assert (out.logits - reference).abs().max() < 1e-4


def test_small_vocabulary_saves_and_loads_in_both(inputs, tmp_path):
    torch.manual_seed(0)
    config = preset("tiny").replace(text={"vocab_size": 1000})
    model = FlorenceModel(config).eval()
    path = Florence(model, config).save(tmp_path / "small")
    assert json.loads((path / "config.json").read_text())["text_config"]["vocab_size"] == 1000
    pixel_values, _, _ = inputs
    prompt, dec = prompt_ids(2, 6, 1000), prompt_ids(2, 4, 1000, seed=3)
    with torch.no_grad():
        ours = model(pixel_values, prompt, dec)
        assert ours.shape == (2, 4, 1000)
        assert torch.equal(fiore.load(path, strategies="none").model(pixel_values, prompt, dec), ours)  # exact
        # transformers cannot place an <image> token in a 1000-token vocabulary; feed it the merged embeddings.
        hf = transformers.Florence2ForConditionalGeneration.from_pretrained(path).eval()
        feats = hf.model.get_image_features(pixel_values).pooler_output
        embeds = torch.cat([feats, hf.get_input_embeddings()(prompt)], dim=1)
        out = hf(inputs_embeds=embeds, decoder_input_ids=dec)
    assert (out.logits - ours).abs().max() < 1e-4


def test_load_in_bfloat16_keeps_weights_tied(native):
    florence = fiore.load(native[1], dtype=torch.bfloat16)
    model = florence.model
    assert model.dtype == torch.bfloat16 and not model.training
    assert model.lm_head.weight is model.language_model.shared.weight
    assert model.language_model.encoder.embed_tokens is model.language_model.shared
    assert (
        sum(p.numel() for p in model.parameters())
        == sum(v.numel() for v in load_file(native[1] / "model.safetensors").values()) - 100 * 256
    )


def test_checkpoint_without_tokenizer_loads_but_tokenizer_raises(native):
    florence = fiore.load(native[1])
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        _ = florence.tokenizer
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        _ = florence.processor


@needs_tokenizer_files
def test_tokenizer_files_travel_with_save(native, tmp_path):
    src = tmp_path / "with_tok"
    src.mkdir()
    for f in native[1].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    for f in TOKENIZER_DIR.glob("*.json"):
        (src / f.name).write_bytes(f.read_bytes())
    florence = fiore.load(src)
    florence.save(tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (TOKENIZER_DIR / "tokenizer.json").read_bytes()
    from fiore import tokenizer

    reloaded = fiore.load(tmp_path / "out")
    assert isinstance(reloaded.tokenizer, tokenizer.Tokenizer)
    reloaded.save(tmp_path / "again")  # tokenizer loaded: it saves itself; processor files still come along
    assert (tmp_path / "again" / "preprocessor_config.json").exists()
    assert isinstance(fiore.load(tmp_path / "again").tokenizer, tokenizer.Tokenizer)


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda b: b"", "is empty"),
        (lambda b: b[: len(b) // 2], "corrupt or truncated"),  # cut mid-tensor
        (lambda b: b"\xff" * 8 + b[8:], "corrupt or truncated"),  # header length garbled
        (lambda b: b[:8] + b"{not json" + b[17:], "corrupt or truncated"),  # header text garbled
    ],
)
def test_corrupt_weights_name_the_file(native, tmp_path, damage, message):
    """A damaged model.safetensors is a CheckpointError naming the file, from the API and from the CLI."""
    from typer.testing import CliRunner

    from fiore.cli import app

    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text((native[1] / "config.json").read_text())
    (d / "model.safetensors").write_bytes(damage((native[1] / "model.safetensors").read_bytes()))
    with pytest.raises(CheckpointError, match=message) as e:
        load_checkpoint(d)
    assert str(d / "model.safetensors") in str(e.value)
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    result = CliRunner().invoke(app, ["predict", str(image), "--task", "caption", "--model", str(d)])
    flat = "".join(ch for ch in result.output if not ch.isspace() and ch not in "│╭╮╰╯─")  # rich wraps the box
    assert result.exit_code != 0 and "model.safetensors" in flat and "Traceback" not in result.output
