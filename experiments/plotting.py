"""Small plotting helpers shared by figure files: a readable style and saving as PNG + PDF."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: figure files run on clusters and in tests

import matplotlib.pyplot as plt  # noqa: E402

STYLE = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 9,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "savefig.bbox": "tight",
    "savefig.dpi": 150,
    "pdf.fonttype": 42,  # editable text in the PDF
}


def subplots(*args: Any, **kwargs: Any):
    """`plt.subplots` under the shared style (constrained layout unless told otherwise)."""
    kwargs.setdefault("layout", "constrained")
    with plt.rc_context(STYLE):
        return plt.subplots(*args, **kwargs)


def save(fig, stem: str | Path) -> list[Path]:
    """Saves `fig` as `<stem>.png` and `<stem>.pdf`, closes it, and returns both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    with plt.rc_context(STYLE):
        for p in paths:
            fig.savefig(p)
    plt.close(fig)
    return paths
