"""Student-t intervals and paired differences, pinned to values computed by hand."""

import math

import pytest

from red.stats import mean_ci95, paired_diff, t975


def test_t_quantiles_match_tables():
    assert t975(1) == 12.7062 and t975(2) == 4.3027 and t975(30) == 2.0423
    # beyond the table: standard values t_{0.975,40} = 2.0211, t_{0.975,60} = 2.0003, t_{0.975,120} = 1.9799
    assert t975(40) == pytest.approx(2.0211, abs=2e-4)
    assert t975(60) == pytest.approx(2.0003, abs=2e-4)
    assert t975(120) == pytest.approx(1.9799, abs=1e-4)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t975(0)


def test_mean_ci95_by_hand():
    # [1, 2, 3]: mean 2, s = 1, half-width 4.3027 / sqrt(3) = 2.484165
    r = mean_ci95([1.0, 2.0, 3.0])
    assert r["n"] == 3 and r["mean"] == 2.0
    assert r["ci95"] == pytest.approx([2 - 2.484165, 2 + 2.484165], abs=1e-6)
    # [0.5, 0.7]: mean 0.6, s = 0.1414214, half-width 12.7062 * 0.1414214 / sqrt(2) = 1.27062
    r = mean_ci95([0.5, 0.7])
    assert r["mean"] == pytest.approx(0.6) and r["ci95"] == pytest.approx([-0.67062, 1.87062], abs=1e-6)
    # equal values: zero width
    assert mean_ci95([0.25, 0.25, 0.25])["ci95"] == pytest.approx([0.25, 0.25])


def test_mean_ci95_degenerate_and_missing_values():
    one = mean_ci95([0.4])
    assert one["mean"] == 0.4 and one["n"] == 1 and all(math.isnan(v) for v in one["ci95"])
    none = mean_ci95([])
    assert none["n"] == 0 and math.isnan(none["mean"])
    # None / NaN values are dropped, not counted
    assert mean_ci95([1.0, None, float("nan"), 3.0])["n"] == 2


def test_paired_difference_by_seed():
    # diffs by seed: 0.2, 0.0, 0.3 -> mean 0.1666667, s = 0.1527525, half-width 4.3027 * s / sqrt(3) = 0.3794625
    a = {0: 0.7, 1: 0.6, 2: 0.9, 3: 0.1}  # seed 3 has no partner: not counted
    b = {2: 0.6, 0: 0.5, 1: 0.6}
    r = paired_diff(a, b)
    assert r["n"] == 3 and r["diff_mean"] == pytest.approx(1 / 6)
    assert r["ci95"] == pytest.approx([1 / 6 - 0.3794625, 1 / 6 + 0.3794625], abs=1e-6)
    # pairing matters: the unpaired spread of a and b is far larger than that of the differences
    shifted = paired_diff({0: 0.1, 1: 0.5, 2: 0.9}, {0: 0.0, 1: 0.4, 2: 0.8})
    assert shifted["diff_mean"] == pytest.approx(0.1) and shifted["ci95"] == pytest.approx(
        [0.1, 0.1], abs=1e-9
    )
