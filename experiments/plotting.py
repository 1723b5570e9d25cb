"""Small plotting helpers shared by figure files: a readable style and saving as PNG + PDF."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # headless: figure files run on clusters and in tests

import matplotlib.pyplot as plt

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


def log_ticks(ax, values, fmt=lambda v: f"{v:g}", axis: str = "x") -> None:
    """Log scale on `axis` with one labelled tick per swept value (and no minor labels): sweeps span one to
    three decades, where matplotlib's automatic minor labels overlap."""
    values = sorted(set(float(v) for v in values))
    labels = [fmt(v) for v in values]
    a = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    a.set_major_locator(matplotlib.ticker.FixedLocator(values))
    a.set_major_formatter(matplotlib.ticker.FixedFormatter(labels))
    a.set_minor_locator(matplotlib.ticker.NullLocator())


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


def errorbar(ax, xs, rows, key: str, fmt: str = "o-", *, x_key: str | None = None, **kwargs: Any):
    """`ax.errorbar` of `row[key]` against `xs` with each row's 95% interval over seeds (`<key>_ci95`) as the
    error bar (x error bars from `<x_key>_ci95` when given); rows without an interval (one seed) get none."""
    from forgetting.experiments import stats

    def bars(k: str):
        errs = [stats.error(r, k) for r in rows]
        return list(zip(*errs)) if any(a or b for a, b in errs) else None

    kwargs.setdefault("capsize", 3)
    return ax.errorbar(xs, [r[key] for r in rows], yerr=bars(key), xerr=bars(x_key) if x_key else None, fmt=fmt,
                       **kwargs)


def pm(row: dict, key: str, fmt: str = "{:.3f}") -> str:
    """`row[key]` as text, with ± the half-width of its 95% interval over seeds when it has one."""
    value, ci = row.get(key), row.get(f"{key}_ci95")
    if value is None:
        return "n/a"
    text = fmt.format(value)
    return text + (" ± " + fmt.format((ci["high"] - ci["low"]) / 2) if ci else "")


def seeds_note(summary: dict) -> str:
    """' (mean of n seeds, bars: 95% t interval)' for a summary merged over several seeds, else ''."""
    n = summary.get("seeds_summarized", 1)
    return f" (mean of {n} seeds, bars: 95% t interval)" if isinstance(n, int) and n > 1 else ""
