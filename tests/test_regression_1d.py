"""The 1-D regression illustration (mini preset): finetuning forgets the old region, the KL term keeps it."""
from __future__ import annotations

import json

import pytest

from forgetting.experiments import framework, regression_1d as r1d


@pytest.mark.slow
def test_mini_kl_keeps_old_region(tmp_path):
    out = tmp_path / "r1d"
    summary = framework.main(r1d.Knobs, r1d.PRESETS, r1d.runs, r1d.summarize, r1d.plot,
                             doc=r1d.__doc__, argv=["--out", str(out), "--seeds", "1"], progress=False)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    old, new = on_disk["old_rmse"], on_disk["new_rmse"]
    assert set(old) == {"before", "finetuned", "kl"} and set(new) == {"finetuned", "kl"}
    # the fit matches the old points to about the noise level (0.1)
    assert old["before"] < 0.2
    # claim: finetuning on new points alone wrecks the old region; KL keeps it (>= 3x apart)
    assert old["finetuned"] >= 3 * old["kl"], old
    # and the KL run fits the new points about as well
    assert new["kl"] <= 1.25 * new["finetuned"] + 0.02, new
    assert new["kl"] < 0.2
    for ext in ("png", "pdf"):
        assert (out / f"regression_1d.{ext}").stat().st_size > 0
    # plotting from the run directories alone gives the same summary
    (out / "summary.json").unlink()
    again = framework.main(r1d.Knobs, r1d.PRESETS, r1d.runs, r1d.summarize, r1d.plot,
                           argv=["--out", str(out), "--seeds", "1", "--plot_only"], progress=False)
    assert again == summary


def test_knobs_validate():
    with pytest.raises(SystemExit):
        framework.parse_args(r1d.Knobs, r1d.PRESETS, ["--method", "mcmc"])
    _, k = framework.parse_args(r1d.Knobs, r1d.PRESETS, ["--scale", "paper"])
    assert k.method == "sghmc"
