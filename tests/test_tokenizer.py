"""Tokenizer: Florence-2 layout, ids equal to transformers' on the same files, trained BPE, pieces/decode."""

import json
import random

import pytest
from reference_files import TOKENIZER_DIR, needs_tokenizer_files

from fiore.tokenizer import BASE_SPECIALS, FLORENCE_TOKENS, IMAGE, MASK, Tokenizer

REF = TOKENIZER_DIR
CORPUS = [
    "a red star next to a blue circle",
    "the large green square is above the small yellow triangle",
    "two cats sit on a mat; one cat is black",
    "What does the image describe? Locate the objects with category name in the image.",
    "héllo wörld, 世界 and emoji 🎉 in a caption",
] * 20


@pytest.fixture(scope="module")
def trained():
    return Tokenizer.train(CORPUS, vocab_size=400)


def test_trained_layout(trained, tmp_path):
    assert [trained.id_to_token(i) for i in range(4)] == BASE_SPECIALS
    assert (trained.bos_id, trained.pad_id, trained.eos_id) == (0, 1, 2)
    mask = trained.token_to_id(MASK)
    # <mask> closes the text vocabulary, then the Florence tokens in order, then <image>
    assert [trained.token_to_id(t) for t in FLORENCE_TOKENS] == list(range(mask + 1, mask + 1 + len(FLORENCE_TOKENS)))
    assert trained.token_to_id(IMAGE) == mask + 1 + len(FLORENCE_TOKENS) == trained.vocab_size - 1
    assert trained.loc_id(0) == trained.token_to_id("<loc_0>") and trained.loc_id(999) == trained.loc_id(0) + 999
    assert trained.vocab_size < 2000  # small vocabulary for models trained by fiore
    trained.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    assert again.vocab_size == trained.vocab_size
    text = "the cat<loc_3><loc_999> 世界</s>"
    assert again.encode(text) == trained.encode(text)
    assert all(again.id_to_token(i) == trained.id_to_token(i) for i in range(trained.vocab_size))


def test_encode_decode_pieces(trained):
    text = "a red star<loc_5><loc_10><loc_20><loc_30><sep>héllo 世界 🎉"
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    assert ids[0] != trained.bos_id  # no specials added
    assert "<loc_5>" in trained.pieces(ids)
    rng = random.Random(0)
    for _ in range(300):  # arbitrary ids, including ones that split UTF-8 characters
        ids = [rng.randrange(trained.vocab_size) for _ in range(rng.randrange(1, 25))]
        assert "".join(trained.pieces(ids)) == trained.decode(ids)


def test_train_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="at least 260"):
        Tokenizer.train(CORPUS, vocab_size=100)


def test_from_dir_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_vocab_merges_files(trained, tmp_path):
    """vocab.json + merges.txt (no tokenizer.json) loads with the same ids."""
    trained.save(tmp_path / "full")
    model = json.loads((tmp_path / "full" / "tokenizer.json").read_text())["model"]
    d = tmp_path / "vm"
    d.mkdir()
    base = {t: i for t, i in model["vocab"].items()}
    (d / "vocab.json").write_text(json.dumps(base))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    loaded = Tokenizer.from_dir(d)
    text = "two cats<loc_7> sit 世界"
    assert loaded.encode(text) == trained.encode(text)
    assert loaded.loc_id(7) == trained.loc_id(7)


needs_ref = needs_tokenizer_files


@needs_ref
def test_reference_ids():
    tok = Tokenizer.from_dir(REF)
    assert tok.token_to_id("<od>") == 50265 and tok.loc_id(0) == 50269 and tok.loc_id(999) == 51268
    assert tok.token_to_id("<and>") == 51288 and tok.image_id == 51289 and tok.vocab_size == 51290
    assert [tok.bos_id, *tok.encode("What does the image describe?"), tok.eos_id] == [
        0,
        2264,
        473,
        5,
        2274,
        6190,
        116,
        2,
    ]
    # the space before an added token is its own token (1437), as in the official processor
    assert tok.encode("the region <loc_52>")[1:] == [976, 1437, 50321]


def test_ids_match_transformers_on_small_bpe(trained, tmp_path):
    """vocab.json + merges.txt of a small BPE, loaded by transformers' BART tokenizer with the Florence-2 tokens
    added the way the official processor adds them, gives the same ids as ours on the same files."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import AddedToken

    trained.save(tmp_path / "full")
    model = json.loads((tmp_path / "full" / "tokenizer.json").read_text())["model"]
    vocab = dict(model["vocab"])
    vocab[MASK] = len(vocab)  # BART keeps <mask> as the last base-vocabulary entry
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    ours = Tokenizer.from_dir(tmp_path)
    theirs = transformers.BartTokenizerFast.from_pretrained(str(tmp_path))
    theirs.add_special_tokens({"additional_special_tokens": FLORENCE_TOKENS})
    theirs.add_tokens(AddedToken(IMAGE, special=True, normalized=False), special_tokens=True)
    assert ours.vocab_size == len(theirs)
    for t in BASE_SPECIALS + [MASK, IMAGE, "<od>", "<loc_0>", "<loc_999>", "<sep>", "<and>"]:
        assert ours.token_to_id(t) == theirs.convert_tokens_to_ids(t), t
    for text in CORPUS[:5] + ["<s>What is the region <loc_1><loc_2><loc_3><loc_4>?</s>", "two  spaces\nnewline <poly>"]:
        ids = theirs(text, add_special_tokens=False).input_ids
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
