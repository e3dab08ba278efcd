"""golf/stats.py against reference values computed once with scipy 1.17.1 (not needed to run these)."""
import math

import pytest

from golf import stats

# (t, df, scipy.stats.t.cdf, two-sided p)
T_TABLE = [
    (0.5, 1, 0.6475836176504333, 0.7048327646991335),
    (-1.3, 2, 0.16162351590802015, 0.3232470318160403),
    (2.1, 3.5, 0.9432370873896009, 0.11352582522079814),
    (2.776, 4, 0.9749886108400118, 0.05002277831997642),
    (-3.2, 7.3, 0.007119834019329153, 0.014239668038658306),
    (1.96, 30, 0.9703288435519748, 0.05934231289605049),
    (0.1, 200, 0.5397777537478394, 0.920444492504321),
    (4.0, 1000, 0.9999659950403956, 6.800991920878163e-05),
    (12.0, 5, 0.9999645525374142, 7.089492517161522e-05),
]
A = [1.101, 1.107, 1.098, 1.112, 1.104]
B = [1.095, 1.099, 1.101, 1.090]


@pytest.mark.parametrize("t,df,cdf,p", T_TABLE)
def test_t_distribution_matches_scipy(t, df, cdf, p):
    assert stats.t_cdf(t, df) == pytest.approx(cdf, rel=1e-10, abs=1e-14)
    assert stats.t_sf2(t, df) == pytest.approx(p, rel=1e-9)


@pytest.mark.parametrize("q,df,expected", [(0.975, 2, 4.302652729749462), (0.975, 4, 2.7764451051977934),
                                           (0.995, 9.5, 3.2070156284394886), (0.025, 30, -2.042272456301238),
                                           (0.9, 1, 3.0776835371752544)])
def test_t_quantiles(q, df, expected):
    assert stats.t_ppf(q, df) == pytest.approx(expected, rel=1e-10)


def test_incomplete_beta_on_both_sides_of_the_switch():
    assert stats.betainc(2.5, 0.5, 0.3) == pytest.approx(0.018927124071945658, rel=1e-12)
    assert stats.betainc(0.5, 7.0, 0.9) == pytest.approx(0.9999999780702157, rel=1e-12)
    assert stats.betainc(50, 0.5, 0.97) == pytest.approx(0.08169933372182264, rel=1e-10)


def test_welch_t_and_its_degrees_of_freedom():
    t, df, p = stats.welch_t(A, B)
    assert t == pytest.approx(2.377009396835647, rel=1e-10)
    assert df == pytest.approx(6.851112603712891, rel=1e-10)
    assert p == pytest.approx(0.04985986776725139, rel=1e-9)


def test_paired_t():
    t, df, p = stats.paired_t([1.2244, 1.2251, 1.2239], [1.2190, 1.2205, 1.2188])
    assert (t, df) == (pytest.approx(21.571428571437146, rel=1e-9), 2)
    assert p == pytest.approx(0.0021421257851250157, rel=1e-9)


def test_mean_ci_and_std():
    m, lo, hi = stats.mean_ci(A)
    assert (lo, hi) == (pytest.approx(1.0976789380382297, rel=1e-12), pytest.approx(1.1111210619617704, rel=1e-12))
    assert m == pytest.approx(sum(A) / 5)
    assert math.isnan(stats.mean_std([1.0])[1]) and math.isnan(stats.mean_ci([1.0])[1])


def test_cohens_d_pooled_and_paired():
    assert stats.cohens_d(A, B) == pytest.approx(1.5728433255189456, rel=1e-10)
    assert stats.cohens_d([2.0, 3.0, 5.0], [1.0, 1.0, 2.0], paired=True) == pytest.approx(2.0 / math.sqrt(1.0))


def test_holm_steps_down_and_keeps_order():
    adjusted = stats.holm([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, math.nan, 0.6]) == pytest.approx([1.0, math.nan, 1.0], nan_ok=True)


def test_spearman_with_ties():
    rho, p = stats.spearman([0.02, 0.03, 0.04, 0.02, 0.03, 0.04, 0.05, 0.06],
                            [1.31, 1.29, 1.27, 1.30, 1.30, 1.26, 1.27, 1.25])
    assert rho == pytest.approx(-0.9141276325084521, rel=1e-10)
    assert p == pytest.approx(0.00148286525285168, rel=1e-8)
    rho, p = stats.spearman([1, 2, 3, 4, 5, 6, 7], [2, 1, 4, 3, 7, 5, 6])
    assert (rho, p) == (pytest.approx(0.8214285714285715), pytest.approx(0.0234488083456915, rel=1e-8))


def test_compare_verdicts():
    base = [1.2244, 1.2251, 1.2239]
    better = stats.compare(base, [1.2190, 1.2205, 1.2188], paired=True, min_effect=0.005, alpha=0.01)
    assert better["verdict"] == "better" and better["delta"] < 0 and better["p"] < 0.01
    assert better["delta_ci"][0] < better["delta"] < better["delta_ci"][1] < 0
    small = stats.compare(base, [1.2224, 1.2232, 1.2220], paired=True, min_effect=0.005, alpha=0.01)
    assert small["verdict"] == "inside noise" and "minimum effect" in small["reason"]
    noisy = stats.compare(base, [1.2300, 1.2150, 1.2260], paired=False, min_effect=0.005, alpha=0.01)
    assert noisy["verdict"] == "inside noise" and noisy["p"] > 0.01
    worse = stats.compare(base, [1.2344, 1.2349, 1.2341], paired=True)
    assert worse["verdict"] == "worse"
    one_seed = stats.compare([1.0], [0.9])
    assert one_seed["verdict"] == "inside noise" and math.isnan(one_seed["p"])


def test_identical_samples_give_no_evidence():
    assert stats.paired_t([1.0, 2.0], [1.0, 2.0]) == (0.0, 1.0, 1.0)
    assert stats.compare([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], paired=True)["verdict"] == "inside noise"
