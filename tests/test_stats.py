"""experiments/stats.py: the t quantile against printed table values, the interval and the merge of
per-seed summaries against hand-computed numbers."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st

from forgetting.experiments import stats as S

# t_{0.975, df} from a printed Student-t table (3 decimals)
TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         15: 2.131, 20: 2.086, 25: 2.060, 29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


@pytest.mark.parametrize("df", sorted(TABLE))
def test_t_quantile_matches_the_table(df):
    assert S.t_quantile(0.975, df) == pytest.approx(TABLE[df], abs=5e-4)


def test_t_quantile_other_levels_and_limits():
    assert S.t_quantile(0.95, 10) == pytest.approx(1.812, abs=5e-4)  # one-sided 5%, table
    assert S.t_quantile(0.995, 5) == pytest.approx(4.032, abs=5e-4)
    assert S.t_quantile(0.025, 2) == pytest.approx(-4.303, abs=5e-4)  # symmetric
    assert S.t_quantile(0.975, 1e6) == pytest.approx(1.95996, abs=1e-4)  # the normal limit
    assert S.t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-12)
    # df = 1 is the Cauchy distribution: quantile tan(pi (p - 1/2)) in closed form
    assert S.t_quantile(0.9, 1) == pytest.approx(math.tan(math.pi * 0.4), rel=1e-9)
    # df = 2 has the closed form t = (2p - 1) sqrt(2 / (4p(1-p)))
    p = 0.975
    assert S.t_quantile(p, 2) == pytest.approx((2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p))), rel=1e-9)
    with pytest.raises(ValueError, match="p must be"):
        S.t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        S.t_cdf(1.0, 0)


@settings(deadline=None)
@given(st.floats(0.51, 0.999), st.integers(1, 200))
def test_t_quantile_inverts_the_cdf(p, df):
    assert S.t_cdf(S.t_quantile(p, df), df) == pytest.approx(p, abs=1e-9)


def test_against_scipy_when_installed():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 7, 13, 31, 77, 500):
        for p in (0.6, 0.9, 0.975, 0.999):
            assert S.t_quantile(p, df) == pytest.approx(float(scipy_stats.t.ppf(p, df)), rel=1e-8)


def test_interval_by_hand():
    # [1, 2, 3]: mean 2, s = 1, half-width t_{0.975,2} / sqrt(3) = 4.302653 / 1.732051 = 2.484138
    lo, hi = S.t_interval([1.0, 2.0, 3.0])
    assert (lo, hi) == (pytest.approx(2 - 2.484138, abs=1e-6), pytest.approx(2 + 2.484138, abs=1e-6))
    # [0.5, 0.7]: mean 0.6, s = 0.141421, half-width 12.706205 * 0.141421 / 1.414214 = 1.270620
    lo, hi = S.t_interval([0.5, 0.7])
    assert lo == pytest.approx(0.6 - 1.270620, abs=1e-6) and hi == pytest.approx(0.6 + 1.270620, abs=1e-6)
    assert S.std([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]) == pytest.approx(math.sqrt(32 / 7))
    with pytest.raises(ValueError, match="at least two"):
        S.t_interval([1.0])


@settings(deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=12))
def test_interval_contains_the_mean_and_is_symmetric(xs):
    lo, hi = S.t_interval(xs)
    m = S.mean(xs)
    assert lo <= m + 1e-9 and m - 1e-9 <= hi
    assert (m - lo) == pytest.approx(hi - m, abs=1e-6)


def test_merge_by_hand():
    per = [{"rows": [{"d": 8, "loss": 1.0, "ok": True, "coeff": "1", "miss": None}], "k": 3, "name": "x",
            "curve": [1, 2]},
           {"rows": [{"d": 8, "loss": 2.0, "ok": False, "coeff": "3", "miss": 4.0}], "k": 3, "name": "x",
            "curve": [1, 2, 3]},
           {"rows": [{"d": 8, "loss": 3.0, "ok": True, "coeff": "1", "miss": None}], "k": 3, "name": "x",
            "curve": [5]}]
    m = S.merge(per)
    row = m["rows"][0]
    assert row["loss"] == pytest.approx(2.0)
    assert row["loss_ci95"] == {"low": pytest.approx(2 - 2.484138, abs=1e-6), "high": pytest.approx(2 + 2.484138, abs=1e-6)}
    assert row["d"] == 8 and "d_ci95" not in row and m["k"] == 3 and "k_ci95" not in m  # equal in every seed
    assert row["ok"] is False  # True only if in every seed
    assert row["coeff"] == ["1", "3", "1"]  # disagreeing non-numbers: the per-seed values
    assert row["miss"] == 4.0 and "miss_ci95" not in row  # mean over the seeds that have one
    assert m["name"] == "x" and m["curve"] == [[1, 2], [1, 2, 3], [5]]
    assert S.merge([per[0]]) is per[0]  # one seed: exactly its summary
    assert S.merge([{"x": float("nan")}, {"x": 1.0}, {"x": 3.0}]) == {"x": 2.0, "x_ci95": S.merge([{"x": 1.0}, {"x": 3.0}])["x_ci95"]}


def test_error_bars():
    assert S.error({"x": 2.0, "x_ci95": {"low": 1.5, "high": 3.0}}, "x") == (0.5, 1.0)
    assert S.error({"x": 2.0}, "x") == (0.0, 0.0) and S.error({"x": None, "x_ci95": {"low": 1, "high": 2}}, "x") == (0.0, 0.0)
