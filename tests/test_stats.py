"""dft.stats: intervals, paired tests, Holm, power and the seed bootstrap, against hand values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dft import DftError
from dft import stats as S


def test_wilson_7_of_20_equals_statsmodels():
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = S.wilson_interval(7, 20)
    ref = proportion_confint(7, 20, alpha=0.05, method="wilson")
    assert abs(lo - ref[0]) < 1e-12 and abs(hi - ref[1]) < 1e-12
    # the closed form (Wilson 1927): (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)
    p, n, z = 0.35, 20, 1.959963984540054
    c = math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert lo == pytest.approx((p + z * z / (2 * n) - z * c) / (1 + z * z / n), abs=1e-12)
    assert hi == pytest.approx((p + z * z / (2 * n) + z * c) / (1 + z * z / n), abs=1e-12)
    assert round(lo, 4) == 0.1812 and round(hi, 4) == 0.5671
    st = S.accuracy_stats([1] * 7 + [0] * 13)
    assert st["n"] == 20 and st["acc"] == 0.35 and (st["ci_low"], st["ci_high"]) == (lo, hi)
    assert st["stderr"] == pytest.approx(math.sqrt(0.35 * 0.65 / 19), abs=1e-15)  # sem, ddof=1
    assert S.accuracy_stats([]) == {"n": 0, "acc": None, "stderr": None, "ci_low": None, "ci_high": None}


def test_mcnemar_ten_discordant_all_one_way():
    a = [True] * 10 + [True] * 5 + [False] * 5
    b = [False] * 10 + [True] * 5 + [False] * 5
    r = S.mcnemar_exact(a, b)
    assert (r["n10"], r["n01"]) == (10, 0)
    assert r["p"] == pytest.approx(2 * 0.5 ** 10, abs=1e-15) and r["p"] == pytest.approx(0.001953125, abs=1e-15)
    assert S.mcnemar_exact(b, a)["p"] == pytest.approx(0.001953125, abs=1e-15)
    with pytest.raises(DftError, match="differ in length: 2 vs 3"):
        S.mcnemar_exact([1, 0], [1, 0, 1])


def test_bootstrap_reproducible_and_paired():
    rng = np.random.default_rng(3)
    a = rng.random(200) < 0.6
    b = a.copy()
    b[:30] = ~b[:30]
    r1, r2 = S.paired_bootstrap(a, b), S.paired_bootstrap(a, b)
    assert r1 == r2
    assert r1["diff"] == pytest.approx(a.mean() - b.mean(), abs=1e-12)
    assert r1["ci_low"] <= r1["diff"] <= r1["ci_high"]
    # scipy's own one-sample bootstrap of the per-item differences with the same rng draws the
    # same resamples: the vectorised contrast path must give its interval exactly
    from scipy.stats import bootstrap

    ref = bootstrap((a.astype(float) - b.astype(float),), np.mean, n_resamples=S.N_RESAMPLES, method="percentile",
                    rng=np.random.default_rng(S.SEED), batch=1000)
    assert r1["ci_low"] == pytest.approx(ref.confidence_interval.low, abs=1e-12)
    assert r1["ci_high"] == pytest.approx(ref.confidence_interval.high, abs=1e-12)


def test_rigged_sets_significant_and_identical_sets_not():
    a = [True] * 100
    b = [True] * 50 + [False] * 50  # a is 50 points better, all 50 discordant items one way
    boot, mc = S.paired_bootstrap(a, b), S.mcnemar_exact(a, b)
    assert boot["diff"] == 0.5 and boot["ci_low"] > 0.35 and boot["p"] < 1e-3
    assert mc["p"] == pytest.approx(2 * 0.5 ** 50)
    same = S.paired_bootstrap(b, b)
    assert same == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p": 1.0, "n": 100}
    assert S.mcnemar_exact(b, b)["p"] == 1.0


def test_merge_minus_mean_of_parents_contrast():
    m = np.array([1, 1, 1, 0, 1, 0], float)
    p1 = np.array([1, 0, 1, 0, 0, 0], float)
    p2 = np.array([0, 1, 1, 0, 0, 1], float)
    r = S.bootstrap_contrasts(np.stack([m, p1, p2], 1), [{0: 1, 1: -0.5, 2: -0.5}], n_resamples=2000)
    # merged 4/6, parents 2/6 and 3/6: 4/6 - 5/12 = 0.25
    assert r["estimate"][0] == pytest.approx(0.25, abs=1e-12)
    assert r["ci_low"][0] <= 0.25 <= r["ci_high"][0]


def test_perplexity_bootstrap_and_contrast():
    nll = np.array([[10.0, 12.0], [20.0, 22.0], [30.0, 29.0]])
    tok = np.array([10, 10, 10])
    own = S.bootstrap_perplexity(nll, tok, n_resamples=500)
    assert own["estimate"] == pytest.approx([math.exp(60 / 30), math.exp(63 / 30)])
    d = S.bootstrap_perplexity(nll, tok, [{0: 1, 1: -1}], n_resamples=500)
    assert d["estimate"][0] == pytest.approx(math.exp(2.0) - math.exp(2.1))
    same = S.bootstrap_perplexity(nll[:, [0, 0]], tok, [{0: 1, 1: -1}], n_resamples=500)
    assert (same["estimate"][0], same["ci_low"][0], same["ci_high"][0], same["p"][0]) == (0.0, 0.0, 0.0, 1.0)


def test_holm_matches_hand_computation():
    # sorted p: 0.01*3=0.03, 0.02*2=0.04, 0.04*1 -> max(0.04, 0.04)
    adj, rej = S.holm([0.04, 0.01, None, 0.02])
    assert adj[1] == pytest.approx(0.03) and adj[3] == pytest.approx(0.04) and adj[0] == pytest.approx(0.04)
    assert adj[2] is None and rej == [True, True, None, True]
    adj, rej = S.holm([0.03, 0.02])
    assert adj == pytest.approx([0.04, 0.04]) and rej == [True, True]


def test_min_detectable_difference_has_the_stated_power():
    from statsmodels.stats.power import TTestPower

    n, psi = 2258, 0.3
    d = S.min_detectable_difference(n, psi)
    pw = TTestPower().power(effect_size=d / math.sqrt(psi - d * d), nobs=n, alpha=0.05)
    assert pw == pytest.approx(0.8, abs=1e-4)  # solve_power's root-finder tolerance
    assert 0.03 < d < 0.04  # ~3.3 points for eval=full's 2,258 items
    # Monte Carlo with the exact McNemar test itself: power at that difference is about 0.8
    rng = np.random.default_rng(0)
    from scipy.stats import binomtest

    hits = 0
    for _ in range(400):
        disc = rng.binomial(n, psi)
        n10 = rng.binomial(disc, (psi + d) / (2 * psi))
        hits += binomtest(n10, disc, 0.5).pvalue < 0.05
    assert 0.72 < hits / 400 < 0.88
    assert S.min_detectable_difference(20, psi) > 0.25  # eval=quick: 20 items
    assert S.min_detectable_difference(2) is None
    # positive and falling with n (statsmodels' root finder returned -0.0392 for n = 1525: the sign is dropped)
    ds = [S.min_detectable_difference(k) for k in (20, 135, 307, 426, 650, 1000, 1473, 1525, 2258, 5000)]
    assert all(x > 0 for x in ds) and ds == sorted(ds, reverse=True)
    assert S.min_detectable_difference(1525) == pytest.approx(0.0392, abs=1e-4)


def test_seed_bootstrap_two_levels():
    r = S.seed_bootstrap([0.5, 0.6, 0.7], 1000)
    assert r["mean"] == pytest.approx(0.6) and r["seed_sd"] == pytest.approx(0.1)
    assert r["item_se"] == pytest.approx(math.sqrt((0.25 + 0.24 + 0.21) / 3 / 1000))
    assert r["ci_low"] < 0.6 < r["ci_high"] and r == S.seed_bootstrap([0.5, 0.6, 0.7], 1000)
    seeds_only = S.seed_bootstrap([0.5, 0.6, 0.7], 1000, items=False)
    assert seeds_only["ci_low"] >= 0.5 and seeds_only["ci_high"] <= 0.7 and seeds_only["item_se"] is None
    one = S.seed_bootstrap([0.4], 20)
    assert one["seed_sd"] is None and one["ci_low"] < 0.4 < one["ci_high"]


def test_a_bootstrap_p_of_zero_is_printed_below_the_resampling_resolution():
    from dft.stats import N_RESAMPLES, format_p

    assert format_p(0.0) == f"p < {1 / N_RESAMPLES:g}" == "p < 0.0001"
    assert format_p(0.0, "p_adj") == "p_adj < 0.0001"
    assert format_p(0.0234) == "p = 0.023"
