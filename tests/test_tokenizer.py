"""Tokenizer training (byte-level BPE -> tiktoken) and text sources."""
from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings, strategies as st

from forgetting.corpora import sources

from forgetting.stages import tokenizer

VOCAB, N_RESERVED = 400, 3
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ün", "é", "日本", "ß", "th", "er", "in"]


def make_text(seed: int, n_docs: int = 60) -> str:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(rng.randint(5, 40))]
        words += [str(rng.randint(0, 99999)), "a,b.", "x\ty", "(z)!"]
        rng.shuffle(words)
        docs.append(" ".join(words))
    return "\n\n".join(docs) + "\n"


def train(tmp_path, name="tok", text=None, **kw):
    src = tmp_path / f"{name}.txt"
    src.write_text(text if text is not None else make_text(0))
    cfg = tokenizer.Config(sources=(str(src),), vocab_size=kw.pop("vocab_size", VOCAB), n_reserved=N_RESERVED,
                           out=str(tmp_path / f"{name}.tiktoken"), workers=kw.pop("workers", 1), progress=False, **kw)
    return cfg, tokenizer.train_tokenizer(cfg)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    cfg, meta = train(tmp_path_factory.mktemp("tok"))
    return tokenizer.load(cfg.out), cfg, meta


def test_layout(tok):
    enc, cfg, meta = tok
    assert enc.n_vocab == VOCAB
    assert enc.eot_token == VOCAB - 1 == meta["eos_id"]
    assert [enc.encode_single_token(f"<|reserved_{i}|>") for i in range(N_RESERVED)] == list(range(VOCAB - 4, VOCAB - 1))
    assert all(enc.decode_single_token_bytes(i) == bytes([i]) for i in range(256))
    assert meta["stats"]["merges"] == VOCAB - N_RESERVED - 1 - 256
    assert json.loads(open(cfg.out + ".json").read())["sha256"] == tokenizer.file_sha256(cfg.out)


@settings(deadline=None, max_examples=150)
@given(st.text())
def test_roundtrip_arbitrary_unicode(tok, text):
    enc = tok[0]
    assert enc.decode(enc.encode_ordinary(text)) == text


@settings(deadline=None, max_examples=60)
@given(st.lists(st.sampled_from(["<|endoftext|>", "<|reserved_0|>", "<|", "|>", "abc", " ", "\n"])).map("".join) | st.text())
def test_special_tokens_never_from_text(tok, text):
    enc = tok[0]
    ids = enc.encode_ordinary(text)
    assert all(i < VOCAB - N_RESERVED - 1 for i in ids)
    assert enc.decode(ids) == text


def test_merges_compress(tok):
    enc = tok[0]
    text = make_text(5)
    assert len(enc.encode_ordinary(text)) < 0.6 * len(text.encode())


def test_training_is_deterministic(tmp_path, tok):
    cfg1, _ = train(tmp_path, "a")
    cfg2, _ = train(tmp_path, "b", workers=2)  # parallel counting gives the same result
    a = open(cfg1.out, "rb").read()
    assert a == open(cfg2.out, "rb").read() == open(tok[1].out, "rb").read()


def test_load_is_not_cached_by_path(tmp_path):
    cfg, _ = train(tmp_path, "t", text=make_text(1))
    first = tokenizer.load(cfg.out).encode_ordinary(make_text(3))
    train(tmp_path, "t", text=make_text(2, n_docs=30).replace("ka", "qq"))
    second = tokenizer.load(cfg.out).encode_ordinary(make_text(3))
    assert first != second


def test_learn_merges_tie_break():
    # counts: (a,a)=3, (a,b)=1 in "aaab"x1 plus ("cd": 3); (a,a) and (c,d) tie at 3 -> smaller ids first: (97,97).
    merged = tokenizer.learn_merges({b"aaab": 1, b"aa": 1, b"cd": 3}, 2)
    assert merged == [b"aa", b"cd"]


def test_empty_and_tiny_corpus(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        train(tmp_path, "e", text="\n\n\n")
    with pytest.raises(ValueError, match="too small"):
        train(tmp_path, "s", text="ab\n")


def test_bad_input_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nsecond \xff\xfe line\n")
    cfg = tokenizer.Config(sources=(str(bad),), vocab_size=300, n_reserved=0, out=str(tmp_path / "x.tiktoken"),
                           workers=1, progress=False)
    with pytest.raises(ValueError, match=r"bad\.txt.*line 2.*byte offset 17"):
        tokenizer.train_tokenizer(cfg)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        tokenizer.train_tokenizer(dataclasses_replace(cfg, sources=(str(tmp_path / "missing.txt"),)))


def dataclasses_replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


def test_cli_exit_code_and_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        tokenizer.main(["--sources", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "t.tiktoken")])
    assert e.value.code == 2
    assert "nope.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        tokenizer.main(["--sources", "x.txt", "--vocab_size", "100"])  # validate(): argparse-style error
    assert e.value.code == 2


def test_sources_txt_jsonl_dir(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("doc one\nline two\n\n\n doc two \n")
    (d / "sub" / "b.jsonl").write_text('{"text": "three"}\n\n{"text": "four\\n\\nfour"}\n')
    (d / "ignored.md").write_text("nope")
    assert list(sources.iter_documents([str(d)])) == ["doc one\nline two", " doc two ", "three", "four\n\nfour"]
    (d / "sub" / "c.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl: line 1 has no string field 'text'"):
        list(sources.iter_documents([str(d)]))


def test_long_document_is_cut_into_pieces(tmp_path):
    p = tmp_path / "long.txt"
    doc = "".join(f"line {i}\n" for i in range(100)).rstrip("\n")
    p.write_text(doc + "\n\nnext\n")
    pieces = list(sources.iter_txt(p, max_piece_chars=50))
    assert len(pieces) > 5 and [x.ends_document for x in pieces].count(True) == 2
    assert list(sources.iter_documents([str(p)])) == [doc, "next"]


def test_parse_hf_spec():
    assert sources.parse_hf_spec("hf:allenai/c4:en") == {"path": "allenai/c4", "name": "en", "split": "train", "streaming": True}
    assert sources.parse_hf_spec("hf:json:d/x.jsonl:validation") == {
        "path": "json", "data_files": "d/x.jsonl", "split": "validation", "streaming": True}
    with pytest.raises(ValueError):
        sources.parse_hf_spec("hf:")


def test_hf_streaming_local_json(tmp_path):
    pytest.importorskip("datasets")
    p = tmp_path / "rows.jsonl"
    p.write_text("".join(json.dumps({"text": f"row {i} ü"}) + "\n" for i in range(7)))
    assert list(sources.iter_documents([f"hf:json:{p}"])) == list(sources.iter_documents([str(p)]))
    cfg = tokenizer.Config(sources=(f"hf:json:{p}",), vocab_size=260, n_reserved=0, out=str(tmp_path / "h.tiktoken"),
                           workers=1, progress=False)
    assert tokenizer.train_tokenizer(cfg)["stats"]["pieces"] == 7
