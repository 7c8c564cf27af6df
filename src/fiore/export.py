"""Export a checkpoint to ONNX in the layout of the published Florence-2 ONNX models (transformers.js loads it).

    OUT/config.json, generation_config.json, tokenizer files, preprocessor_config.json
    OUT/onnx/vision_encoder.onnx        pixel_values (B, 3, H, W)                      -> image_features (B, N, d)
    OUT/onnx/embed_tokens.onnx          input_ids (B, T)                               -> inputs_embeds (B, T, d)
    OUT/onnx/encoder_model.onnx         inputs_embeds (B, S, d), attention_mask (B, S) -> last_hidden_state
    OUT/onnx/decoder_model_merged.onnx  inputs_embeds, encoder_hidden_states, encoder_attention_mask,
                                        past_key_values.{i}.{decoder,encoder}.{key,value}, use_cache_branch
                                        -> logits, present.{i}.{decoder,encoder}.{key,value}

The encoder's input is the image features followed by the prompt's embeddings (as transformers.js and
transformers join them). The decoder is "merged" in the optimum sense, one graph for the first step and the steps
after it, without an If node: the past tensors carry their own lengths. On the first step they are empty (length 0)
and the cross-attention keys and values are computed from `encoder_hidden_states`; afterwards the encoder ones are
passed back and only the encoder positions they do not cover (none) are projected. `use_cache_branch` is accepted
for callers that follow optimum's convention; the past's lengths decide.

Each graph is made by `torch.onnx.export` (the torch.export-based exporter) from the model's own modules; the
decoder step runs the model's `Decoder.from_embeddings` with `GraphCache`, a cache whose past comes in as graph
inputs. Needs `pip install 'fiore[export]'` (onnx, onnxscript; onnxruntime to validate).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from fiore.checkpoint import load_model, native_config, tokenizer_files
from fiore.florence import checkpoint_dir
from fiore.model import FlorenceModel

OPSET = 18
GRAPHS = ("vision_encoder", "embed_tokens", "encoder_model", "decoder_model_merged")

# Florence-2's post-processing type per task token (the official processor's table); other tokens: pure_text.
POST_PROCESSING = {
    "<OCR_WITH_REGION>": "ocr",
    "<OD>": "description_with_bboxes",
    "<DENSE_REGION_CAPTION>": "description_with_bboxes",
    "<REGION_PROPOSAL>": "bboxes",
    "<CAPTION_TO_PHRASE_GROUNDING>": "phrase_grounding",
    "<REFERRING_EXPRESSION_SEGMENTATION>": "polygons",
    "<REGION_TO_SEGMENTATION>": "polygons",
    "<OPEN_VOCABULARY_DETECTION>": "description_with_bboxes_or_polygons",
}


class GraphCache:
    """`fiore.model.cache.DecoderCache`'s interface over past keys and values that arrive as graph inputs: `update`
    appends the step's keys and values to the past (the results are the step's `present` outputs)."""

    def __init__(self, past_k, past_v, cross_k, cross_v):
        self.past_k, self.past_v = list(past_k), list(past_v)
        self.cross_k, self.cross_v = cross_k, cross_v
        self.length = past_k[0].shape[2]

    def positions(self, t: int) -> torch.Tensor:
        return torch.arange(t, device=self.past_k[0].device) + self.length

    def advance(self, t: int) -> None:
        """Nothing to do: the presents are the outputs, and the next call's past says its own length."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.past_k[layer] = torch.cat([self.past_k[layer], k], dim=2)
        self.past_v[layer] = torch.cat([self.past_v[layer], v], dim=2)
        return self.past_k[layer], self.past_v[layer]

    def causal_mask(self, t: int) -> torch.Tensor:
        past = self.past_k[0].shape[2] - t  # update() has run: the past now includes the t new positions
        queries = torch.arange(t, device=self.past_k[0].device) + past
        return queries[:, None] >= torch.arange(past + t, device=self.past_k[0].device)[None, :]


class VisionEncoder(nn.Module):
    def __init__(self, model: FlorenceModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


class EmbedTokens(nn.Module):
    def __init__(self, model: FlorenceModel):
        super().__init__()
        self.encoder = model.language_model.encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder.embed(input_ids)


class EncoderModel(nn.Module):
    def __init__(self, model: FlorenceModel):
        super().__init__()
        self.encoder = model.language_model.encoder

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(inputs_embeds, attention_mask.to(torch.bool))


class DecoderStep(nn.Module):
    """One decoder call over past keys and values given as inputs; outputs logits and the presents."""

    def __init__(self, model: FlorenceModel):
        super().__init__()
        self.model = model
        self.layers = len(model.language_model.decoder.layers)

    def forward(self, inputs_embeds, encoder_hidden_states, encoder_attention_mask, use_cache_branch, *past):
        del use_cache_branch  # the past's own lengths decide (module docstring)
        decoder = self.model.language_model.decoder
        self_k, self_v, cross_k, cross_v = (list(past[i::4]) for i in range(4))
        for i, layer in enumerate(decoder.layers):
            covered = cross_k[i].shape[2]  # encoder positions whose keys/values are already in the past
            k, v = layer.encoder_attn.kv(encoder_hidden_states[:, covered:])
            cross_k[i] = torch.cat([cross_k[i], k], dim=2)
            cross_v[i] = torch.cat([cross_v[i], v], dim=2)
        cache = GraphCache(self_k, self_v, cross_k, cross_v)
        hidden = decoder.from_embeddings(inputs_embeds, None, encoder_attention_mask.to(torch.bool), cache)
        presents = []
        for i in range(self.layers):
            presents += [cache.past_k[i], cache.past_v[i], cross_k[i], cross_v[i]]
        return (self.model.logits(hidden), *presents)


def past_names(layers: int, prefix: str) -> list[str]:
    """past_key_values.{i}.decoder.key, ...value, ...encoder.key, ...value per layer (present.* for outputs)."""
    return [
        f"{prefix}.{i}.{part}.{kv}" for i in range(layers) for part in ("decoder", "encoder") for kv in ("key", "value")
    ]


def _export(module, args, path: Path, inputs, outputs, dynamic_shapes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes=dynamic_shapes,
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    program.save(str(path))
    _name_dims(path)


def _name_dims(path: Path) -> None:
    """Give symbolic dims the names transformers.js resolves: the batch dim `batch_size`, past lengths their own
    names (it feeds empty past on the first step by reading these)."""
    import onnx

    model = onnx.load(str(path))
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        for axis, dim in enumerate(dims):
            if not dim.HasField("dim_param"):
                continue
            if axis == 0:
                dim.dim_param = "batch_size"
            elif value.name.startswith(("past_key_values", "present")) and axis == 2:
                part = "decoder" if ".decoder." in value.name else "encoder"
                kind = "past" if value.name.startswith("past") else "present"
                dim.dim_param = f"{kind}_{part}_sequence_length"
    onnx.save(model, str(path))


def export_onnx(checkpoint: str | Path | None, out: str | Path) -> Path:
    """Write the ONNX layout (module docstring) for `checkpoint` (None = the shipped model) into `out`."""
    from torch.export import Dim

    source = checkpoint_dir(checkpoint)
    model, config = load_model(source)
    model.eval().requires_grad_(False)
    out = Path(out)
    (out / "onnx").mkdir(parents=True, exist_ok=True)
    t = config.text
    heads, head_dim = t.decoder_attention_heads, t.d_model // t.decoder_attention_heads
    h, w = config.image_size
    batch, seq, tgt = Dim("batch_size", min=1), Dim("sequence_length", min=1), Dim("decoder_sequence_length", min=1)
    past_len, enc_len = Dim("past_decoder_sequence_length", min=0), Dim("encoder_sequence_length", min=1)
    past_enc_len = Dim("past_encoder_sequence_length", min=0)
    layers = t.decoder_layers

    with torch.no_grad():
        _export(
            VisionEncoder(model),
            (torch.randn(2, 3, h, w),),
            out / "onnx" / "vision_encoder.onnx",
            ["pixel_values"],
            ["image_features"],
            {"pixel_values": {0: batch}},
        )
        _export(
            EmbedTokens(model),
            (torch.ones(2, 5, dtype=torch.long),),
            out / "onnx" / "embed_tokens.onnx",
            ["input_ids"],
            ["inputs_embeds"],
            {"input_ids": {0: batch, 1: seq}},
        )
        _export(
            EncoderModel(model),
            (torch.randn(2, 7, t.d_model), torch.ones(2, 7, dtype=torch.long)),
            out / "onnx" / "encoder_model.onnx",
            ["inputs_embeds", "attention_mask"],
            ["last_hidden_state"],
            {"inputs_embeds": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
        )
        n_enc, n_past = 7, 3  # example lengths; every one is a dynamic dim of the graph
        past = []
        for _ in range(layers):
            past += [torch.randn(2, heads, n_past, head_dim) for _ in range(2)]
            past += [torch.randn(2, heads, n_enc, head_dim) for _ in range(2)]
        order = past_names(layers, "past_key_values")
        _export(
            DecoderStep(model),
            (
                torch.randn(2, 2, t.d_model),
                torch.randn(2, n_enc, t.d_model),
                torch.ones(2, n_enc, dtype=torch.long),
                torch.tensor([True]),
                *past,
            ),
            out / "onnx" / "decoder_model_merged.onnx",
            ["inputs_embeds", "encoder_hidden_states", "encoder_attention_mask", "use_cache_branch", *order],
            ["logits", *past_names(layers, "present")],
            {
                "inputs_embeds": {0: batch, 1: tgt},
                "encoder_hidden_states": {0: batch, 1: enc_len},
                "encoder_attention_mask": {0: batch, 1: enc_len},
                "use_cache_branch": None,
                "past": tuple({0: batch, 2: past_len if ".decoder." in n else past_enc_len} for n in order),
            },
        )
    _write_configs(model, config, source, out)
    return out


def _write_configs(model: FlorenceModel, config, source: Path, out: Path) -> None:
    """config.json, generation_config.json, the tokenizer files and a Florence-2 preprocessor_config.json."""
    from fiore import tasks
    from fiore.tokenizer import Tokenizer

    (out / "config.json").write_text(json.dumps(native_config(config, model.dtype), indent=2) + "\n")
    t = config.text
    generation = {
        "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id,
        "pad_token_id": t.pad_token_id,
        "decoder_start_token_id": t.decoder_start_token_id,
        "forced_eos_token_id": t.eos_token_id,
        "num_beams": 1,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    Tokenizer.from_dir(source).save(out)  # with its <s> ... </s> post-processor, which clients apply to prompts
    for f in tokenizer_files(source):
        if not (out / f.name).exists() and f.name != "preprocessor_config.json":
            (out / f.name).write_bytes(f.read_bytes())
    h, w = config.image_size
    every = tasks.all()
    preprocessor = {
        "processor_class": "Florence2Processor",
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"height": h, "width": w},
        "resample": 3,  # bicubic, as fiore's processor
        "do_center_crop": False,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "do_convert_rgb": True,
        "image_seq_length": 1 + (h // 32) * (w // 32),  # the pooled token + one per 32x32 patch
        "task_prompts_without_inputs": {task.token: task.template for task in every if task.inputs == "none"},
        "task_prompts_with_input": {task.token: task.template for task in every if task.inputs != "none"},
        "tasks_answer_post_processing_type": {
            task.token: POST_PROCESSING.get(task.token, "pure_text") for task in every
        },
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- running an export


class OnnxFlorence:
    """Greedy decoding over an exported folder with plain onnxruntime: how the four graphs fit together, and the
    check of an export against fiore (`check_export`)."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        folder = Path(folder)
        self.sessions = {
            name: ort.InferenceSession(
                str(folder / "onnx" / f"{name}.onnx"), options, providers=["CPUExecutionProvider"]
            )
            for name in GRAPHS
        }
        decoder = self.sessions["decoder_model_merged"]
        self.past = [i for i in decoder.get_inputs() if i.name.startswith("past_key_values.")]
        self.config = json.loads((folder / "config.json").read_text())["text_config"]

    def run(self, name: str, **feeds):
        return self.sessions[name].run(None, feeds)

    def encode(self, pixel_values, input_ids):
        """-> encoder hidden states and mask of image tokens followed by the prompt (numpy)."""
        import numpy as np

        (features,) = self.run("vision_encoder", pixel_values=pixel_values)
        (prompt,) = self.run("embed_tokens", input_ids=input_ids)
        embeds = np.concatenate([features, prompt], axis=1)
        mask = np.ones(embeds.shape[:2], dtype=np.int64)
        (hidden,) = self.run("encoder_model", inputs_embeds=embeds, attention_mask=mask)
        return hidden, mask

    def step(self, token_ids, hidden, mask, past: dict | None):
        """One decoder call -> (logits, the presents as the next call's past)."""
        import numpy as np

        (embeds,) = self.run("embed_tokens", input_ids=token_ids)
        if past is None:
            B = token_ids.shape[0]
            past = {i.name: np.zeros((B, i.shape[1], 0, i.shape[3]), dtype=np.float32) for i in self.past}
        feeds = dict(
            inputs_embeds=embeds,
            encoder_hidden_states=hidden,
            encoder_attention_mask=mask,
            use_cache_branch=np.array([bool(past)]),
            **past,
        )
        logits, *presents = self.run("decoder_model_merged", **feeds)
        names = [
            o.name.replace("present", "past_key_values")
            for o in self.sessions["decoder_model_merged"].get_outputs()[1:]
        ]
        return logits, dict(zip(names, presents, strict=True))

    def greedy(self, pixel_values, input_ids, max_new_tokens: int) -> list[int]:
        """Greedy tokens for one image and prompt (decoder start excluded, end token included when reached)."""
        import numpy as np

        hidden, mask = self.encode(pixel_values, input_ids)
        token, past, out = self.config["decoder_start_token_id"], None, []
        for _ in range(max_new_tokens):
            logits, past = self.step(np.array([[token]], dtype=np.int64), hidden, mask, past)
            token = int(logits[0, -1].argmax())
            out.append(token)
            if token == self.config["eos_token_id"]:
                break
        return out


def check_export(
    folder: str | Path, checkpoint: str | Path | None, image, task: str = "caption", max_new_tokens: int = 20
):
    """Compare an export with fiore on one image: vision features, the first two decoder steps' logits (largest
    absolute difference), greedy tokens, and seconds per greedy run of each. -> dict."""
    import time

    import fiore
    from fiore import tasks
    from fiore.generate import GenerationConfig, generate

    florence = fiore.load(checkpoint)
    model = florence.model
    prompt = tasks.get(task).prompt()
    pixel_values = florence.processor.pixel_values([image])
    input_ids, _ = florence.processor.prompt_ids([prompt])
    runner = OnnxFlorence(folder, threads=torch.get_num_threads())
    report: dict = {}
    with torch.inference_mode():
        t = time.perf_counter()  # fiore: image, prompt and greedy decoding, as the ONNX run below does
        features = model.encode_image(pixel_values)
        hidden, mask = model.encode(features, input_ids)
        want = generate(model, hidden, mask, GenerationConfig(max_new_tokens=max_new_tokens))[0].ids
        report["fiore_seconds"] = time.perf_counter() - t
        (ort_features,) = runner.run("vision_encoder", pixel_values=pixel_values.numpy())
        report["vision_max_abs_diff"] = float((features - torch.from_numpy(ort_features)).abs().max())
        t = time.perf_counter()
        got = runner.greedy(pixel_values.numpy(), input_ids.numpy(), max_new_tokens)
        report["ort_seconds"] = time.perf_counter() - t
        report["tokens_equal"] = got == want
        report["fiore_tokens"], report["ort_tokens"] = want, got
        # teacher-forced logits of the first two steps (the second reads the first's presents)
        ort_hidden, ort_mask = runner.encode(pixel_values.numpy(), input_ids.numpy())
        start = runner.config["decoder_start_token_id"]
        steps = [start, want[0]]
        ort_logits, past = runner.step(torch.tensor([[steps[0]]]).numpy(), ort_hidden, ort_mask, None)
        ort_second, _ = runner.step(torch.tensor([[steps[1]]]).numpy(), ort_hidden, ort_mask, past)
        ref = model.logits(model.decode(torch.tensor([steps]), hidden, mask))
        diffs = [
            float((ref[0, 0] - torch.from_numpy(ort_logits[0, -1])).abs().max()),
            float((ref[0, 1] - torch.from_numpy(ort_second[0, -1])).abs().max()),
        ]
        report["logits_max_abs_diff"] = max(diffs)
    return report
