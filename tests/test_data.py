"""core.data: token files, sequence splits, stateless batch order, mix/replace."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from forgetting.core import data


def write(tmp_path, tokens, name="x.bin", **meta):
    path = tmp_path / name
    data.write_token_file(path, np.asarray(tokens), {"dataset_id": 0, "vocab_size": 1000, "eos_id": 999,
                                                      "tokenizer_sha256": "abc", **meta})
    return path


@settings(deadline=None, max_examples=30)
@given(st.lists(st.integers(0, 65535), min_size=1, max_size=300))
def test_bin_roundtrip(tmp_path_factory, tokens):
    path = write(tmp_path_factory.mktemp("rt"), tokens)
    tf = data.TokenFile(path)
    assert np.array_equal(np.asarray(tf.tokens), tokens) and tf.num_tokens == len(tokens)
    assert tf.max_token_id() == max(tokens) and tf.meta["num_tokens"] == len(tokens)
    assert path.read_bytes() == np.asarray(tokens, dtype="<u2").tobytes()  # little-endian uint16


def test_bad_files(tmp_path):
    path = write(tmp_path, np.arange(100))
    with open(path, "ab") as f:
        f.write(b"\x00")
    with pytest.raises(ValueError, match="not a multiple of 2"):
        data.TokenFile(path)
    path = write(tmp_path, np.arange(100) * 20, name="big.bin")
    with pytest.raises(ValueError, match="token id 1980 but the model's vocab has 1000"):
        data.TokenFile(path, vocab_size=1000)
    data.TokenFile(path, vocab_size=1981)
    with pytest.raises(ValueError, match="tokenizer sha256 abc.*sha256 def"):
        data.TokenFile(path, tokenizer_sha256="def")
    (tmp_path / "e.bin").write_bytes(b"")
    (tmp_path / "e.bin.json").write_text(json.dumps({"dataset_id": 0}))
    with pytest.raises(ValueError, match="empty"):
        data.TokenFile(tmp_path / "e.bin")
    with pytest.raises(ValueError, match="empty"):
        write(tmp_path, [], name="e2.bin")
    (tmp_path / "nosidecar.bin").write_bytes(b"\x01\x00")
    with pytest.raises(FileNotFoundError, match="sidecar"):
        data.TokenFile(tmp_path / "nosidecar.bin")
    meta = json.loads(path.with_suffix(".bin.json").read_text())
    path.with_suffix(".bin.json").write_text(json.dumps({**meta, "num_tokens": 5}))
    with pytest.raises(ValueError, match="says 5 tokens"):
        data.TokenFile(path)


def dataset(tmp_path, num_seqs, seq_len, valid_seqs, seed=0, dataset_id=7):
    # Token t of sequence i is i*seq_len + t, so every row identifies its sequence.
    path = write(tmp_path, np.arange(num_seqs * seq_len + seq_len - 1) % 60000, dataset_id=dataset_id)  # a dropped tail
    return data.SequenceDataset(data.TokenFile(path), seq_len, num_tokens_valid=valid_seqs * seq_len - 1,
                                split_seed=seed)


def seq_ids(rows, seq_len):
    return rows[:, 1] // seq_len  # token 0 is overwritten; token 1 still identifies the sequence


@settings(deadline=None, max_examples=25)
@given(num_seqs=st.integers(2, 60), seq_len=st.integers(2, 9), frac=st.floats(0.01, 0.9), seed=st.integers(0, 99))
def test_split_disjoint_and_covering(tmp_path_factory, num_seqs, seq_len, frac, seed):
    valid = max(1, min(num_seqs - 1, int(frac * num_seqs)))
    ds = dataset(tmp_path_factory.mktemp("s"), num_seqs, seq_len, valid, seed)
    assert ds.num_valid == valid and ds.num_train == num_seqs - valid
    train = set(seq_ids(ds.train_sequences(np.arange(ds.num_train)), seq_len).tolist())
    val = set(np.concatenate([seq_ids(b, seq_len) for b in ds.valid_batches(4)]).tolist())
    assert train.isdisjoint(val) and train | val == set(range(num_seqs))
    again = dataset(tmp_path_factory.mktemp("s"), num_seqs, seq_len, valid, seed)
    assert np.array_equal(again.valid_indices, ds.valid_indices)  # the split is a function of split_seed


def test_rows_and_dataset_id(tmp_path):
    ds = dataset(tmp_path, 20, 5, 4)
    b = ds.train_batch(0, 6, seed=1)
    assert b.dtype == np.int32 and b.shape == (6, 5) and (b[:, 0] == 7).all()
    starts = b[:, 1] - 1
    assert (starts % 5 == 0).all() and (b[:, 1:] == starts[:, None] + np.arange(1, 5)).all()
    raw = data.SequenceDataset(ds.token_file, 5, num_tokens_valid=20, split_seed=0, overwrite_first_with_id=False)
    assert (raw.train_batch(0, 6, seed=1)[:, 0] % 5 == 0).all()


@settings(deadline=None, max_examples=25)
@given(num_train=st.integers(3, 40), batch=st.integers(1, 7), seed=st.integers(0, 5), resume=st.integers(0, 30))
def test_epochs_cover_and_resume(tmp_path_factory, num_train, batch, seed, resume):
    if batch > num_train:
        return
    ds = dataset(tmp_path_factory.mktemp("e"), num_train + 2, 3, 2)
    steps = 40
    uninterrupted = [ds.train_batch(s, batch, seed) for s in range(steps)]
    fresh = dataset(tmp_path_factory.mktemp("e"), num_train + 2, 3, 2)  # a resumed run: new process, step `resume`
    assert all(np.array_equal(fresh.train_batch(s, batch, seed), uninterrupted[s]) for s in range(resume, steps))
    ids = np.concatenate([seq_ids(b, 3) for b in uninterrupted])
    n_full = len(ids) // num_train
    for e in range(n_full):  # every epoch visits each training sequence exactly once
        chunk = ids[e * num_train : (e + 1) * num_train]
        assert sorted(chunk.tolist()) == sorted(seq_ids(ds.train_sequences(np.arange(num_train)), 3).tolist())
    assert ds.epoch_of(steps - 1, batch) == ((steps - 1) * batch) // num_train


def test_each_epoch_reshuffles(tmp_path):
    ds = dataset(tmp_path, 52, 3, 2)
    ids = np.concatenate([seq_ids(ds.train_batch(s, 10, seed=0), 3) for s in range(10)])
    assert not np.array_equal(ids[:50], ids[50:100]) and sorted(ids[:50]) == sorted(ids[50:100])
    other_seed = np.concatenate([seq_ids(ds.train_batch(s, 10, seed=1), 3) for s in range(5)])
    assert not np.array_equal(ids[:50], other_seed)


def test_batch_larger_than_split(tmp_path):
    ds = dataset(tmp_path, 10, 4, 3)
    with pytest.raises(ValueError, match="fewer than one batch of 8"):
        ds.train_batch(0, 8, seed=0)
    with pytest.raises(ValueError, match="leaves no training sequences"):
        dataset(tmp_path, 10, 4, 10)


def test_valid_batches_fixed_order(tmp_path):
    ds = dataset(tmp_path, 30, 4, 11)
    sizes = [len(b) for b in ds.valid_batches(4)]
    assert sizes == [4, 4, 3] and [len(b) for b in ds.valid_batches(4, drop_last=True)] == [4, 4]
    first = np.concatenate(list(ds.valid_batches(4)))
    assert np.array_equal(first, np.concatenate(list(ds.valid_batches(5))))


@settings(deadline=None, max_examples=50)
@given(batch=st.integers(1, 64), fraction=st.floats(0, 1))
def test_mix_replace_rows(batch, fraction):
    main = np.zeros((batch, 3), np.int32)
    other = np.ones((batch, 3), np.int32)
    n = int(np.floor(fraction * batch + 1e-9))
    for fn in (data.mix_batch, data.replace_batch):
        out = fn(main, other, fraction)
        assert out.shape == main.shape and (out[:n] == 1).all() and (out[n:] == 0).all()
    assert (main == 0).all()  # inputs untouched
    assert (data.replace_batch(np.zeros((100, 2)), np.ones((100, 2)), 0.29)[:, 0].sum()) == 29
    with pytest.raises(ValueError):
        data.mix_batch(main, other, 1.5)
