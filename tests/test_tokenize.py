"""The tokenize stage: sources -> uint16 .bin + sidecar."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from forgetting.core import data
from forgetting.stages import tokenize, tokenizer

DOCS = ["first doc\nwith two lines", "second <|endoftext|> doc ü", "third: 日本語 text", "4th", "fifth and last, 12345"]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    src = d / "train.txt"
    rng = np.random.default_rng(0)
    words = [" ".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(3, 9))) for _ in range(400)]
    src.write_text("\n\n".join(DOCS * 20 + words) + "\n")
    cfg = tokenizer.Config(sources=(str(src),), vocab_size=320, n_reserved=2, out=str(d / "t.tiktoken"), workers=1,
                           progress=False)
    tokenizer.train_tokenizer(cfg)
    return cfg.out


def run(tmp_path, tok_path, srcs, **kw):
    cfg = tokenize.Config(sources=tuple(map(str, srcs)), tokenizer=tok_path, out=str(tmp_path / kw.pop("name", "a.bin")),
                          progress=False, threads=1, **kw)
    return cfg, tokenize.tokenize(cfg)


def split_docs(ids: np.ndarray, enc) -> list[str]:
    out, start = [], 0
    for end in np.flatnonzero(ids == enc.eot_token):
        out.append(enc.decode(ids[start:end].tolist()))
        start = end + 1
    return out


def write_txt(tmp_path, docs, name="src.txt"):
    p = tmp_path / name
    p.write_text("\n\n".join(docs) + "\n")
    return p


def test_roundtrip_and_sidecar(tmp_path, tok_path):
    src = write_txt(tmp_path, DOCS)
    cfg, meta = run(tmp_path, tok_path, [src], dataset_id=1)
    enc = tokenizer.load(tok_path)
    ids = np.fromfile(cfg.out, dtype="<u2")
    assert split_docs(ids, enc) == DOCS
    assert ids[-1] == enc.eot_token and (ids == enc.eot_token).sum() == len(DOCS)  # literal "<|endoftext|>" is text
    side = json.loads(open(cfg.out + ".json").read())
    assert side["num_tokens"] == len(ids) == meta["num_tokens"]
    assert side["dataset_id"] == 1 and side["vocab_size"] == enc.n_vocab == 320 and side["eos_id"] == 319
    assert side["tokenizer_sha256"] == tokenizer.file_sha256(tok_path) and side["dtype"] == "uint16"
    tf = data.TokenFile(cfg.out, vocab_size=320, tokenizer_sha256=side["tokenizer_sha256"])
    assert np.array_equal(np.asarray(tf.tokens), ids)


def test_jsonl_and_directory_sources(tmp_path, tok_path):
    d = tmp_path / "dir"
    d.mkdir()
    write_txt(d, DOCS[:2], "a.txt")
    (d / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS[2:]))
    cfg, _ = run(tmp_path, tok_path, [d])
    assert split_docs(np.fromfile(cfg.out, dtype="<u2"), tokenizer.load(tok_path)) == DOCS


def test_shuffle_and_max_tokens(tmp_path, tok_path):
    docs = [f"document number {i}" for i in range(50)]
    src = write_txt(tmp_path, docs)
    enc = tokenizer.load(tok_path)
    cfg_a, _ = run(tmp_path, tok_path, [src], shuffle=True, seed=3, name="s1.bin")
    cfg_b, _ = run(tmp_path, tok_path, [src], shuffle=True, seed=3, name="s2.bin")
    cfg_c, _ = run(tmp_path, tok_path, [src], shuffle=True, seed=4, name="s3.bin")
    a, b, c = (split_docs(np.fromfile(x.out, dtype="<u2"), enc) for x in (cfg_a, cfg_b, cfg_c))
    assert a == b != c and a != docs and Counter(a) == Counter(docs) == Counter(c)
    assert not list(tmp_path.glob("*.staging*"))
    cfg, meta = run(tmp_path, tok_path, [src], max_tokens=37, name="m.bin")
    full = np.fromfile(run(tmp_path, tok_path, [src], name="full.bin")[0].out, dtype="<u2")
    assert meta["num_tokens"] == 37 and np.array_equal(np.fromfile(cfg.out, dtype="<u2"), full[:37])


def test_empty_corpus(tmp_path, tok_path):
    src = tmp_path / "empty.txt"
    src.write_text("\n\n  \n")
    with pytest.raises(ValueError, match="empty"):
        run(tmp_path, tok_path, [src])
    assert not (tmp_path / "a.bin").exists()


def test_non_utf8_names_file_and_line(tmp_path, tok_path):
    src = tmp_path / "latin1.txt"
    src.write_bytes("ok\n\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not valid UTF-8 at line 3, byte offset 7"):
        run(tmp_path, tok_path, [src])
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        run(tmp_path, tok_path, [tmp_path / "nope.jsonl"])


def test_cli(tmp_path, tok_path, capsys):
    src = write_txt(tmp_path, DOCS)
    out = tmp_path / "cli.bin"
    tokenize.main(["--sources", str(src), "--tokenizer", tok_path, "--dataset_id", "1", "--out", str(out)])
    assert json.loads((tmp_path / "cli.bin.json").read_text())["dataset_id"] == 1
    with pytest.raises(SystemExit) as e:
        tokenize.main(["--sources", str(src), "--tokenizer", str(tmp_path / "none.tiktoken"), "--out", str(out)])
    assert e.value.code == 2 and "none.tiktoken" in capsys.readouterr().err
