"""Shared test setup: strict numerics, a fast Hypothesis profile, and tiny model configs.

Keep shapes few: every distinct (config, shape) pair costs a JAX compilation, so the fixtures below are
session-scoped and the property tests draw values, not shapes, wherever they can.
"""
from __future__ import annotations

import os

import jax
import pytest
from hypothesis import HealthCheck, settings

from forgetting.core import host_memory

host_memory.keep_freed_memory()  # before any test starts JAX's threads: large buffers are reused

# Implicit rank promotion hides broadcasting bugs ([B] + [B, 1] -> [B, B]); make it an error.
jax.config.update("jax_numpy_rank_promotion", "raise")

# The first example of a JAX property pays for compilation, so no per-example deadline; few examples
# keep the core suite at about a minute on 2 CPU cores. HYPOTHESIS_PROFILE=thorough for a longer run.
settings.register_profile(
    "fast", deadline=None, max_examples=10, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "thorough", deadline=None, max_examples=200, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))


CORPUS_SEQ_LEN = 32  # the sequence length the synthetic test corpora are cut for
CORPUS_TOKENS = 40_000


@pytest.fixture(scope="session")
def corpora(tmp_path_factory) -> dict[int, str]:
    """Two related synthetic languages (ids 0 and 1, vocab 64), `CORPUS_TOKENS` tokens each: the old and new
    data of the end-to-end stage tests."""
    from forgetting.stages import generate

    root = tmp_path_factory.mktemp("corpora")
    paths = {}
    for lang in (0, 1):
        out = root / f"lang{lang}.bin"
        generate.generate(generate.Config(corpus="synthetic", language=lang, num_tokens=CORPUS_TOKENS, vocab_size=64,
                                          seq_len=CORPUS_SEQ_LEN, out=str(out)))
        paths[lang] = str(out)
    return paths


def tiny_config(dtype: str = "float32", **overrides):
    """A tiny transformer (2 heads of 16, 2 layers, vocab 64, 16 positions): compiles in a second."""
    from forgetting.core import model

    fields = dict(vocab_size=64, d_model=32, n_layers=2, head_dim=16, seq_len=16, dtype=dtype)
    fields.update(overrides)
    return model.ModelConfig(**fields)


@pytest.fixture(scope="session")
def tiny_cfg():
    """f32 compute: properties hold to float32 rounding."""
    return tiny_config("float32")


@pytest.fixture(scope="session")
def tiny_cfg_bf16():
    """The paper's numerics (bf16 matmul inputs, f32 accumulation) at the tiny shape."""
    return tiny_config("bfloat16")


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg):
    """Parameters for `tiny_cfg` (the bf16 config has the same tree). Never donate these: copy first."""
    from forgetting.core import model

    return jax.jit(model.init, static_argnums=0)(tiny_cfg, jax.random.key(0))


@pytest.fixture(scope="session")
def tiny_ref_params(tiny_cfg):
    """A second, independent draw: a reference model different from `tiny_params`."""
    from forgetting.core import model

    return jax.jit(model.init, static_argnums=0)(tiny_cfg, jax.random.key(1))


def pytest_collection_modifyitems(config, items):
    """`cluster` tests (several jax.distributed processes over loopback; a private one-node Slurm) and
    `heavy` tests (a minute or more each on 2 cores: the real SmolLM2 through the harness and the train
    command line, a whole figure killed and resumed) are skipped by the default suite, to keep it short;
    `-m cluster` / `-m heavy` runs them (.ci/run does, after the suite)."""
    markexpr = config.getoption("markexpr") or ""
    how = {"cluster": "`python -m pytest -q -m cluster tests/test_multihost.py tests/test_slurm.py`",
           "heavy": "`python -m pytest -q -n 2 -m heavy`"}
    for marker, command in how.items():
        if marker in markexpr:
            continue
        skip = pytest.mark.skip(reason=f"{marker} test: run with {command}")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)
