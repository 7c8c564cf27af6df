"""Byte-level BPE tokenizer (the `tokenizers` library) with Florence-2's special-token layout.

Layout, identical for a loaded Florence-2 checkpoint and a tokenizer trained here:
    <s>=0, <pad>=1, </s>=2, <unk>=3, text vocabulary ..., <mask>            (the BART base vocabulary)
    <od>, </od>, <ocr>, </ocr>, <loc_0> ... <loc_999>, <cap> ... <poly>, </poly>, <and>   (Florence-2 additions)
    <image>                                                                 (transformers-native image token)
For the official files this gives <od>=50265, <loc_k>=50269+k, <and>=51288, <image>=51289, the ids of
transformers' Florence2Processor. Task tokens such as `<OD>` are NOT tokens: `fiore.tasks` turns them into prompt
text. A tokenizer trained by fiore has a small text vocabulary, so the model's embedding and LM head stay small.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _HFTokenizer

BASE_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
MASK = "<mask>"
IMAGE = "<image>"
NUM_LOCS = 1000
FLORENCE_TOKENS = (
    ["<od>", "</od>", "<ocr>", "</ocr>"]
    + [f"<loc_{k}>" for k in range(NUM_LOCS)]
    + ["<cap>", "</cap>", "<ncap>", "</ncap>", "<dcap>", "</dcap>", "<grounding>", "</grounding>", "<seg>", "</seg>"]
    + ["<sep>", "<region_cap>", "</region_cap>", "<region_to_desciption>", "</region_to_desciption>"]  # sic
    + ["<proposal>", "</proposal>", "<poly>", "</poly>", "<and>"]
)


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable-unicode map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_BYTE_DECODER = _byte_decoder()


class Tokenizer:
    """A `tokenizers.Tokenizer` with Florence-2's added tokens. Ids are plain Python ints."""

    def __init__(self, tokenizer: _HFTokenizer):
        self._tok = tokenizer
        self._tok.no_padding()
        self._tok.no_truncation()
        self._add_florence_tokens()
        if self._tok.post_processor is None:
            # What the official tokenizer.json has: other readers of a saved tokenizer (transformers, transformers.js
            # in an ONNX export) then frame prompts in <s> ... </s> as fiore's `frame` does.
            sep, cls = ("</s>", self.token_to_id("</s>")), ("<s>", self.token_to_id("<s>"))
            self._tok.post_processor = processors.RobertaProcessing(sep, cls, trim_offsets=True, add_prefix_space=False)
        self._specials = set(BASE_SPECIALS + [MASK] + FLORENCE_TOKENS + [IMAGE])

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json`, or `vocab.json` + `merges.txt` (byte-level BPE), from a checkpoint directory."""
        path = Path(path)
        if (path / "tokenizer.json").is_file():
            tok = _HFTokenizer.from_file(str(path / "tokenizer.json"))
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            tok = _HFTokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
        else:
            raise FileNotFoundError(
                f"no tokenizer in {path}: expected tokenizer.json, or vocab.json and merges.txt"
                + ("" if path.is_dir() else " (the directory does not exist)")
            )
        return cls(tok)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
        """Train a byte-level BPE on `texts` with the Florence-2 layout.

        `vocab_size` is the size of the text vocabulary (the 4 base specials + 256 bytes + merges, at least 260);
        `<mask>`, the 1024 Florence-2 tokens and `<image>` come on top, so `.vocab_size == vocab_size + 1026` when
        the corpus supports that many merges.
        """
        min_size = len(BASE_SPECIALS) + 256
        if vocab_size < min_size:
            raise ValueError(f"vocab_size must be at least {min_size} (4 specials + 256 bytes), got {vocab_size}")
        tok = _HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=BASE_SPECIALS,  # ids 0..3, in this order
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def _add_florence_tokens(self) -> None:
        # Existing tokens keep their ids; missing ones are appended in Florence-2's order.
        for group in (BASE_SPECIALS, [MASK], FLORENCE_TOKENS, [IMAGE]):
            self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in group])
        for t in BASE_SPECIALS + [MASK] + FLORENCE_TOKENS + [IMAGE]:
            if self._tok.token_to_id(t) is None:
                raise ValueError(f"tokenizer could not register the special token {t!r}")

    def save(self, path: str | Path) -> None:
        """Write `tokenizer.json` (+ a small `tokenizer_config.json` naming the special tokens) into `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path / "tokenizer.json"))
        config = {
            "tokenizer_class": "BartTokenizer",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "pad_token": "<pad>",
            "unk_token": "<unk>",
            "mask_token": MASK,
            "image_token": IMAGE,
            "model_max_length": 1024,
        }
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    # ---- ids ----------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids including all added tokens (the model's embedding needs at least this many rows)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i

    def id_to_token(self, i: int) -> str:
        t = self._tok.id_to_token(int(i))
        if t is None:
            raise KeyError(f"id {i} is outside the vocabulary (size {self.vocab_size})")
        return t

    @cached_property
    def bos_id(self) -> int:
        return self.token_to_id("<s>")

    @cached_property
    def pad_id(self) -> int:
        return self.token_to_id("<pad>")

    @cached_property
    def eos_id(self) -> int:
        return self.token_to_id("</s>")

    def frame(self, ids: Sequence[int]) -> list[int]:
        """`<s> ids </s>`: how every prompt and target sequence is framed, in training and at inference."""
        return [self.bos_id, *ids, self.eos_id]

    @cached_property
    def image_id(self) -> int:
        return self.token_to_id(IMAGE)

    @cached_property
    def _loc0(self) -> int:
        return self.token_to_id("<loc_0>")

    def loc_id(self, k: int) -> int:
        """Id of `<loc_k>`, k in 0..999 (they are contiguous)."""
        if not 0 <= k < NUM_LOCS:
            raise ValueError(f"location bin must be in 0..{NUM_LOCS - 1}, got {k}")
        return self._loc0 + k

    @cached_property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self.token_to_id(t) for t in self._specials)

    # ---- text ---------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Text -> ids, no `<s>`/`</s>` added. Special tokens written in the text (`<loc_5>`) map to their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text with special tokens kept (`</s><s>car<loc_1>...</s>`)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def pieces(self, ids: Iterable[int]) -> list[str]:
        """One string per id whose concatenation equals `decode(ids)`.

        Byte-level BPE may split a multi-byte character over several tokens; the character is then attributed to
        the token that completes it and the earlier tokens get "" (so per-token log-probs still line up).
        """
        ids = [int(i) for i in ids]
        if not isinstance(self._tok.decoder, decoders.ByteLevel):
            return self._pieces_by_prefix(ids)
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out = []
        for i in ids:
            out.append(utf8.decode(self._token_bytes(i)))
        tail = utf8.decode(b"", final=True)
        if tail:
            out[-1] += tail
        return out

    def _token_bytes(self, i: int) -> bytes:
        token = self.id_to_token(i)
        try:
            return bytes(_BYTE_DECODER[c] for c in token)
        except KeyError:  # not a byte-level string (e.g. an added token with other characters): its own UTF-8
            return token.encode("utf-8")

    def _pieces_by_prefix(self, ids: list[int]) -> list[str]:
        out, prev = [], ""
        for n in range(1, len(ids) + 1):
            cur = self.decode(ids[:n])
            out.append(cur[len(prev) :] if cur.startswith(prev) else cur)
            prev = cur
        return out

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"
