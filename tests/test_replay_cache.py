"""Self-generated replay drawn once per stream (`training.replay_cache`): a run reading the cache ends with
the metrics of a run sampling itself; corrupt, foreign and concurrent caches are handled."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from forgetting.training import replay, replay_cache, runs
from forgetting.stages import train
from forgetting.training.train_config import TrainConfig, replace

T = 32
WALL_CLOCK = ("train_seconds", "wall_time", "tokens_per_s")


def tiny(corpora, run_dir: Path, **changes) -> TrainConfig:
    return replace(TrainConfig(), **{
        "data.path": corpora[0], "data.num_tokens_valid": 2048, "model.d_model": 32, "model.n_layers": 1,
        "model.head_dim": 16, "model.seq_len": T, "model.dtype": "float32", "opt.batch_size": 8,
        "opt.warmup_tokens": 256, "opt.peak_lr": 3e-3, "stop.num_tokens_train": 8 * T * 12,
        "log.every_steps": 2, "log.progress": False, "run.dir": str(run_dir), **changes})


@pytest.fixture(scope="module")
def pretrained(corpora, tmp_path_factory) -> Path:
    cfg = tiny(corpora, tmp_path_factory.mktemp("pre"), **{"stop.num_tokens_train": 8 * T * 16})
    return Path(train.train(cfg)["run_dir"])


def finetune(corpora, pretrained: Path, run_dir: Path, method: str, **changes) -> TrainConfig:
    # 6 steps over buffers of 2: three buffers, the 2nd and 3rd drawn by the prefetch thread
    return tiny(corpora, run_dir, **{"data.path": corpora[1], "model.load_path": str(pretrained), "reg.method": method,
                                     "reg.synth": True, "reg.coeff": 1.0, "reg.batch_size": 4, "reg.buffer": 2,
                                     "stop.num_tokens_train": 8 * T * 6, **changes})


def metrics_text(cfg: TrainConfig) -> str:
    """metrics.jsonl with the wall-clock fields dropped, every other byte as written."""
    lines = (Path(train.run_dir(cfg)) / runs.METRICS_FILE).read_text().splitlines()
    return "\n".join(json.dumps({k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK}, sort_keys=True)
                     for line in lines)


def no_sampling(monkeypatch) -> None:
    def refuse(self, index):
        raise AssertionError(f"buffer {index} was sampled, not read from the cache")
    monkeypatch.setattr(replay.SelfGeneratedReplay, "_sample", refuse)


@pytest.mark.slow
@pytest.mark.parametrize("method,hidden", [("kl_pre", "sampler"), ("ntp_pre", "auto")])
def test_run_reading_the_cache_ends_with_the_metrics_of_sampling(pretrained, corpora, tmp_path, monkeypatch,
                                                                  method, hidden):
    shutil.rmtree(pretrained / replay_cache.CACHE_DIR, ignore_errors=True)
    extra = {"reg.reference_hidden": hidden}
    sampled = finetune(corpora, pretrained, tmp_path / "off", method, **extra, **{"reg.replay_cache": False})
    train.train(sampled)
    assert not (pretrained / replay_cache.CACHE_DIR).exists()  # switched off: nothing written
    writer = finetune(corpora, pretrained, tmp_path / "writer", method, **extra)
    train.train(writer)
    streams = list((pretrained / replay_cache.CACHE_DIR).iterdir())
    assert len(streams) == 1 and sorted(p.name for p in streams[0].glob("buffer-*.bin")) == [
        "buffer-000000.bin", "buffer-000001.bin", "buffer-000002.bin"]
    manifest = json.loads((streams[0] / replay_cache.MANIFEST).read_text())
    assert manifest["key"]["keep_hidden"] is (method == "kl_pre")
    no_sampling(monkeypatch)  # the reader must take every buffer from the cache
    reader = finetune(corpora, pretrained, tmp_path / "reader", method, **extra)
    train.train(reader)
    want = metrics_text(sampled)
    assert want.count("\n") == 3  # steps 0, 2, 4, 6
    assert metrics_text(writer) == want
    assert metrics_text(reader) == want
    assert train.run_dir(reader).name == train.run_dir(sampled).name  # the switch is not part of the run's name


@pytest.mark.slow
def test_corrupt_buffers_are_rebuilt_with_a_warning(pretrained, corpora, tmp_path, capsys):
    shutil.rmtree(pretrained / replay_cache.CACHE_DIR, ignore_errors=True)
    first = finetune(corpora, pretrained, tmp_path / "first", "kl_pre")
    train.train(first)
    stream = next((pretrained / replay_cache.CACHE_DIR).iterdir())
    flipped, truncated = stream / "buffer-000000.bin", stream / "buffer-000002.bin"
    data = bytearray(flipped.read_bytes())
    data[-5] ^= 0xFF  # a byte of the hidden states
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    capsys.readouterr()
    again = finetune(corpora, pretrained, tmp_path / "again", "kl_pre")
    train.train(again)
    err = capsys.readouterr().err
    assert "buffer-000000.bin has hidden whose sha256 does not match" in err
    assert "buffer-000002.bin is truncated" in err
    assert "1 buffer(s) read, 2 sampled and written, 2 rebuilt" in err
    assert metrics_text(again) == metrics_text(first)
    cache = replay_cache.ReplayCache(stream.parent, json.loads((stream / replay_cache.MANIFEST).read_text())["key"])
    for index in range(3):  # rewritten whole
        cache._read(cache.path(index), index)


# ----- the cache on its own: a fake sampler -------------------------------------------------------------------


def key(**changes) -> dict:
    return {"format": replay_cache.FORMAT, "keep_hidden": True, "stream": "test", **changes}


class Sampler:
    """Buffers that depend on the index only; counts its calls (and sleeps, so that writers overlap)."""

    def __init__(self, seconds: float = 0.0):
        self.calls: list[int] = []
        self.seconds = seconds
        self.lock = threading.Lock()

    def __call__(self, index: int):
        with self.lock:
            self.calls.append(index)
        time.sleep(self.seconds)
        rng = np.random.default_rng(index)
        return rng.integers(0, 64, (4, 8), dtype=np.int32), rng.standard_normal((4, 8, 3)).astype(np.float32)


def test_a_second_cache_reads_what_the_first_wrote(tmp_path):
    sampler = Sampler()
    tokens, hidden = replay_cache.ReplayCache(tmp_path, key()).draw(1, sampler)
    cache = replay_cache.ReplayCache(tmp_path, key())
    got_tokens, got_hidden = cache.draw(1, sampler)
    assert sampler.calls == [1] and (cache.read, cache.written) == (1, 0)
    assert got_tokens.dtype == np.int32 and np.array_equal(got_tokens, tokens)
    assert np.asarray(got_hidden).tobytes() == np.asarray(hidden).tobytes()


def test_a_manifest_of_another_stream_is_never_read(tmp_path, capsys):
    mine = replay_cache.ReplayCache(tmp_path, key())
    mine.draw(0, Sampler())
    other = {"format": replay_cache.FORMAT, "stream": mine.digest, "key": key(temperature=0.5)}
    (mine.dir / replay_cache.MANIFEST).write_text(json.dumps(other))
    sampler = Sampler()
    cache = replay_cache.ReplayCache(tmp_path, key())
    assert not cache.usable and "describes another stream" in capsys.readouterr().err
    cache.draw(0, sampler)
    cache.draw(0, sampler)
    assert sampler.calls == [0, 0] and cache.read == 0 and cache.written == 0
    assert json.loads((mine.dir / replay_cache.MANIFEST).read_text()) == other  # left as found


def test_a_buffer_of_another_stream_is_refused(tmp_path, capsys):
    a, b = replay_cache.ReplayCache(tmp_path, key()), replay_cache.ReplayCache(tmp_path, key(temperature=0.5))
    a.draw(0, Sampler())
    shutil.copy(a.path(0), b.path(0))  # a file moved between stream directories
    sampler = Sampler()
    b.draw(0, sampler)
    assert sampler.calls == [0] and b.rebuilt == 1
    assert f"is not buffer 0 of stream {b.digest}" in capsys.readouterr().err
    b._read(b.path(0), 0)  # rewritten as its own


def test_a_corrupt_manifest_is_rewritten(tmp_path, capsys):
    first = replay_cache.ReplayCache(tmp_path, key())
    (first.dir / replay_cache.MANIFEST).write_text("{not json")
    again = replay_cache.ReplayCache(tmp_path, key())
    assert again.usable and "unreadable; rewritten" in capsys.readouterr().err
    assert json.loads((again.dir / replay_cache.MANIFEST).read_text())["key"] == key()


def test_two_writers_in_threads_sample_each_buffer_once(tmp_path):
    sampler = Sampler(seconds=0.2)
    caches = [replay_cache.ReplayCache(tmp_path, key()) for _ in range(2)]
    results: dict[int, list] = {0: [], 1: []}

    def run(i: int) -> None:
        results[i] = [caches[i].draw(index, sampler) for index in range(3)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(sampler.calls) == [0, 1, 2]  # the second writer waited and read
    for (ta, ha), (tb, hb) in zip(results[0], results[1], strict=True):
        assert np.array_equal(ta, tb) and np.asarray(ha).tobytes() == np.asarray(hb).tobytes()


_WRITER = r"""
import sys, time, numpy as np
from forgetting.training import replay_cache
root, log, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
def sample(index):
    with open(log, "a") as f:
        f.write(f"{index}\n")
    time.sleep(0.3)
    rng = np.random.default_rng(index)
    return rng.integers(0, 64, (4, 8), dtype=np.int32), rng.standard_normal((4, 8, 3)).astype(np.float32)
cache = replay_cache.ReplayCache(root, {"format": replay_cache.FORMAT, "keep_hidden": True, "stream": "test"})
time.sleep(max(0.0, start - time.time()))  # both processes start drawing at the same moment
out = [cache.draw(i, sample) for i in range(3)]
print(",".join(str(int(t.sum())) + ":" + str(float(np.asarray(h).sum())) for t, h in out))
"""


def test_two_processes_starting_the_same_stream_do_not_clash(tmp_path):
    log = tmp_path / "sampled.txt"
    start = time.time() + 8  # after both have imported jax
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / "cache"), str(log), str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    assert outs[0][0] == outs[1][0]  # both got the same buffers
    assert sorted(log.read_text().split()) == ["0", "1", "2"]  # each sampled once, by one of them
    stream = next((tmp_path / "cache").iterdir())
    assert sorted(p.name for p in stream.iterdir() if p.suffix == ".bin") == [f"buffer-00000{i}.bin" for i in range(3)]
    assert not list(stream.glob("*.tmp"))
