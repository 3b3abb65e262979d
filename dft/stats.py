"""Uncertainty of dft's numbers: intervals, paired tests, multiplicity, power, seeds as replicates.

Every function here wraps a maintained library routine (scipy.stats, statsmodels); what dft adds
is which routine answers which question, and the bookkeeping (artefacts scored on the same
items are compared item by item). The conventions:

* **A proportion** (an MCQ accuracy, ``k`` of ``n`` items correct) gets the Wilson score
  interval (Wilson 1927; recommended over the Wald interval by Brown, Cai & DasGupta 2001,
  *Statist. Sci.* 16:101) from :func:`statsmodels.stats.proportion.proportion_confint` and the
  standard error of the mean of the 0/1 outcomes (:func:`scipy.stats.sem`, ``ddof=1``: the
  number lm-evaluation-harness prints as ``acc_stderr``).
* **Two artefacts on the same items** are compared paired: the accuracy difference a - b gets a
  percentile bootstrap interval over items (:func:`scipy.stats.bootstrap`, Efron & Tibshirani
  1993, *An Introduction to the Bootstrap*, ch. 13) and an exact McNemar test (McNemar 1947):
  the two-sided binomial test (:func:`scipy.stats.binomtest`) of the discordant pairs against
  p = 1/2. Contrasts that are not a difference of two artefacts (a merge against the mean of its
  parents, perplexity differences) get the bootstrap interval and the bootstrap p-value of the
  same resamples (:func:`bootstrap_p`).
* **Many comparisons**: Holm's step-down correction (Holm 1979, *Scand. J. Statist.* 6:65),
  :func:`statsmodels.stats.multitest.multipletests`.
* **Power before compute**: :func:`min_detectable_difference` (paired test on per-item
  differences, :class:`statsmodels.stats.power.TTestPower`).
* **Seeds as replicates**: :func:`seed_bootstrap`, a two-level bootstrap (seeds, then items;
  Davison & Hinkley 1997, *Bootstrap Methods and their Application*, §3.8).

The bootstrap is vectorised over resamples *and* over contrasts: scipy draws the resampled item
indices once per item set, and :func:`bootstrap_contrasts` turns each resample into item counts
and evaluates every artefact's mean and every contrast from one matrix product, so a whole
sweep's comparisons on one benchmark cost one call (bench/stats_bench.py).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence

import numpy as np

from dft import DftError

#: significance level of every interval (1 - ALPHA) and test
ALPHA = 0.05
#: bootstrap resamples (scipy's default is 9999)
N_RESAMPLES = 10_000
#: the bootstrap's random seed: the same inputs give the same interval on every run
SEED = 0
#: key suffixes of a metric's uncertainty in eval records, ``summary.json`` metrics and W&B
#: (``mascqa/acc`` -> ``mascqa/acc_stderr``, ``mascqa/acc_ci_low``, ``mascqa/acc_ci_high``)
UNCERTAINTY_SUFFIXES = ("_stderr", "_ci_low", "_ci_high")


def is_uncertainty_key(key: str) -> bool:
    """Whether a metric key is a point estimate's companion (its stderr, interval bound or ``n``)."""
    return key.endswith(UNCERTAINTY_SUFFIXES) or key.split("/")[-1] == "n"


#: the discordance rate (fraction of items two recipes answer differently, one right and one
#: wrong) assumed by :func:`min_detectable_difference` when none is measured
DEFAULT_DISCORDANCE = 0.3


def _outcomes(x) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    if a.ndim != 1:
        raise DftError(f"expected one outcome per item (a 1-d array), got shape {a.shape}")
    return a


# ------------------------------------------------------------------------------ one proportion
def wilson_interval(k: int, n: int, alpha: float = ALPHA) -> tuple[Optional[float], Optional[float]]:
    """The Wilson score interval of ``k`` successes in ``n`` trials at level ``1 - alpha``.

    statsmodels' ``proportion_confint(k, n, alpha, method="wilson")``; fractions in [0, 1].
    ``(None, None)`` for ``n == 0``.
    """
    if n <= 0:
        return None, None
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = proportion_confint(int(k), int(n), alpha=alpha, method="wilson")
    return float(lo), float(hi)


def accuracy_stats(correct: Sequence[bool], alpha: float = ALPHA) -> dict:
    """``{n, acc, stderr, ci_low, ci_high}`` of per-item 0/1 outcomes.

    ``acc`` = mean (a fraction), ``stderr`` = :func:`scipy.stats.sem` (``ddof=1``; None for
    fewer than two items), ``ci_low``/``ci_high`` = :func:`wilson_interval` at ``1 - alpha``.
    Every value is None for an empty list.
    """
    from scipy.stats import sem

    x = _outcomes(correct)
    n = int(x.size)
    if n == 0:
        return {"n": 0, "acc": None, "stderr": None, "ci_low": None, "ci_high": None}
    lo, hi = wilson_interval(int(x.sum()), n, alpha)
    return {"n": n, "acc": float(x.mean()), "stderr": float(sem(x)) if n > 1 else None,
            "ci_low": lo, "ci_high": hi}


# ------------------------------------------------------------------------------ paired tests
def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact McNemar test of two artefacts' per-item outcomes on the same items.

    ``n10`` = items ``a`` got right and ``b`` wrong, ``n01`` the reverse; ``p`` = the two-sided
    :func:`scipy.stats.binomtest` of ``n10`` in ``n10 + n01`` trials at 1/2 (1.0 when no item is
    discordant). Raises :class:`DftError` when the lengths differ.
    """
    x, y = _outcomes(a).astype(bool), _outcomes(b).astype(bool)
    if x.shape != y.shape:
        raise DftError(f"paired outcomes differ in length: {x.size} vs {y.size} items")
    n10, n01 = int((x & ~y).sum()), int((~x & y).sum())
    return {"n10": n10, "n01": n01, "p": _mcnemar_p(n10, n01)}


@functools.lru_cache(maxsize=65536)
def _mcnemar_p(n10: int, n01: int) -> float:
    """The exact McNemar p of a discordant split (memoised: a sweep repeats the same splits)."""
    from scipy.stats import binomtest

    return 1.0 if n10 + n01 == 0 else float(binomtest(n10, n10 + n01, 0.5).pvalue)


def format_p(p: float, name: str = "p") -> str:
    """``"p = 0.023"``, or ``"p < 0.0001"`` for a bootstrap p of 0: no resample of the
    :data:`N_RESAMPLES` reached the null, so the p-value is below their resolution, not 0."""
    if p == 0:
        return f"{name} < {1 / N_RESAMPLES:g}"
    return f"{name} = {p:.2g}"


def bootstrap_p(distribution: np.ndarray) -> np.ndarray:
    """Two-sided bootstrap p-value of "the contrast is 0", per row of ``distribution``.

    ``p = min(1, 2 * min(P*(theta <= 0), P*(theta >= 0)))`` over the bootstrap replicates
    ``theta`` (the last axis): the test obtained by inverting the equal-tailed percentile
    interval (the smallest alpha at which it excludes 0), so ``p < alpha`` exactly when the
    ``1 - alpha`` percentile interval lies on one side of 0 (up to resampling ties). A
    distribution that is 0 everywhere (identical artefacts) gives 1.
    """
    d = np.asarray(distribution, dtype=float)
    le, ge = (d <= 0).mean(axis=-1), (d >= 0).mean(axis=-1)
    return np.minimum(1.0, 2 * np.minimum(le, ge))


def _bootstrap(n_units: int, stat: Callable[[np.ndarray], np.ndarray], n_out: int, *,
               n_resamples: int, seed: int, confidence: float, batch: Optional[int]) -> dict:
    """scipy's percentile bootstrap over ``n_units`` paired units, ``stat(counts)`` vectorised.

    ``stat`` gets ``counts`` of shape ``[b, n_units]`` (how often each unit is in each of ``b``
    resamples; all ones for the original sample) and returns ``[n_out, b]``.
    """
    from scipy.stats import bootstrap

    if n_units < 1:
        raise DftError("bootstrap over an empty item set")

    def statistic(idx, axis=-1):
        idx = np.asarray(idx)
        flat = idx.reshape(-1, idx.shape[-1])
        b, m = flat.shape
        # resample b of unit indices -> unit counts: one bincount over row-offset indices
        counts = np.bincount((flat + n_units * np.arange(b)[:, None]).ravel(),
                             minlength=b * n_units).reshape(b, n_units).astype(np.float64)
        return stat(counts).reshape((n_out,) + idx.shape[:-1])

    if n_units == 1:  # nothing to resample: the distribution is the estimate itself
        est = stat(np.ones((1, 1)))[:, 0]
        dist = np.repeat(est[:, None], n_resamples, axis=1)
        return {"estimate": est, "ci_low": est.copy(), "ci_high": est.copy(), "distribution": dist}
    res = bootstrap((np.arange(n_units),), statistic, vectorized=True, paired=False, axis=-1,
                    n_resamples=n_resamples, batch=batch, confidence_level=confidence,
                    method="percentile", rng=np.random.default_rng(seed))
    est = stat(np.ones((1, n_units)))[:, 0]
    return {"estimate": est, "ci_low": np.atleast_1d(res.confidence_interval.low),
            "ci_high": np.atleast_1d(res.confidence_interval.high),
            "distribution": np.atleast_2d(res.bootstrap_distribution)}


def _contrast_matrix(contrasts: Sequence[dict[int, float]], k: int):
    """``[K, C]`` sparse weights (a contrast touches two or three artefacts of thousands)."""
    from scipy.sparse import csr_matrix

    rows = [i for c in contrasts for i in c]
    cols = [j for j, c in enumerate(contrasts) for _ in c]
    vals = [float(v) for c in contrasts for v in c.values()]
    return csr_matrix((vals, (rows, cols)), shape=(k, len(contrasts)))


def _apply(w, per_artefact: np.ndarray) -> np.ndarray:
    """``[C, b]`` contrasts of ``[b, K]`` per-artefact statistics."""
    return np.asarray(w.T @ per_artefact.T)


def bootstrap_contrasts(values: np.ndarray, contrasts: Sequence[dict[int, float]], *,
                        n_resamples: int = N_RESAMPLES, seed: int = SEED, alpha: float = ALPHA,
                        batch: Optional[int] = 1000) -> dict:
    """Paired percentile bootstrap of linear contrasts of per-item means.

    Args:
        values: ``[n_items, K]``, one column per artefact, all scored on the same items (e.g.
            0/1 correctness).
        contrasts: one ``{column: weight}`` per contrast; ``{a: 1, b: -1}`` is mean(a) -
            mean(b), ``{m: 1, p1: -0.5, p2: -0.5}`` a merge minus the mean of its parents.
        n_resamples, seed, alpha: ``1 - alpha`` interval from ``n_resamples`` resamples of the
            items (the same resamples for every artefact: that is what pairs them), drawn by
            :func:`scipy.stats.bootstrap` with ``numpy.random.default_rng(seed)``.
        batch: resamples per vectorised call (memory ~ ``batch * (n_items + K)`` floats).

    Returns ``{"estimate", "ci_low", "ci_high", "p", "distribution"}``, arrays over contrasts
    (``distribution``: ``[n_contrasts, n_resamples]``; ``p``: :func:`bootstrap_p`).
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 2:
        raise DftError(f"values must be [n_items, n_artefacts], got shape {x.shape}")
    n, k = x.shape
    w = _contrast_matrix(contrasts, k)
    # 0/1 outcomes and resample counts are small integers: their float32 product is exact
    # (sums below 2**24) and twice as fast as float64
    small_ints = bool(np.all(x == np.round(x))) and n * float(np.abs(x).max(initial=0)) < 2 ** 24
    xm = x.astype(np.float32) if small_ints else x

    def stat(c):
        sums = (c.astype(xm.dtype) @ xm).astype(np.float64)
        return _apply(w, sums) / n  # contrast the sums, then divide: (14 - 4) / 20 is exactly 0.5

    out = _bootstrap(n, stat, w.shape[1], n_resamples=n_resamples, seed=seed, confidence=1 - alpha, batch=batch)
    out["p"] = bootstrap_p(out["distribution"])
    return out


def paired_bootstrap(a: Sequence[float], b: Sequence[float], **kw) -> dict:
    """mean(a) - mean(b) of two artefacts scored on the same items, with its paired bootstrap
    interval and p-value (:func:`bootstrap_contrasts`); floats instead of arrays."""
    x, y = _outcomes(a), _outcomes(b)
    if x.shape != y.shape:
        raise DftError(f"paired outcomes differ in length: {x.size} vs {y.size} items")
    r = bootstrap_contrasts(np.stack([x, y], axis=1), [{0: 1.0, 1: -1.0}], **kw)
    return {"diff": float(r["estimate"][0]), "ci_low": float(r["ci_low"][0]),
            "ci_high": float(r["ci_high"][0]), "p": float(r["p"][0]), "n": int(x.size)}


def bootstrap_perplexity(nll: np.ndarray, tokens: np.ndarray, contrasts: Sequence[dict[int, float]] | None = None, *,
                         n_resamples: int = N_RESAMPLES, seed: int = SEED, alpha: float = ALPHA,
                         batch: Optional[int] = 1000) -> dict:
    """Paired bootstrap over token blocks of perplexities, or of contrasts between them.

    Args:
        nll: ``[n_blocks, K]`` summed NLL (nats) of each block under each of ``K`` artefacts.
        tokens: ``[n_blocks]`` or ``[n_blocks, K]`` predicted tokens per block.
        contrasts: ``{column: weight}`` per contrast of perplexities (``{a: 1, b: -1}``:
            ppl(a) - ppl(b)); None = each artefact's own perplexity.

    A resample draws blocks with replacement; each artefact's perplexity is
    ``exp(sum nll / sum tokens)`` over the drawn blocks (token-weighted, like
    :func:`dft.evaluation.perplexity.perplexity`). Returns :func:`bootstrap_contrasts`' dict.
    """
    s = np.asarray(nll, dtype=np.float64)
    if s.ndim == 1:
        s = s[:, None]
    t = np.asarray(tokens, dtype=np.float64)
    t = np.broadcast_to(t[:, None] if t.ndim == 1 else t, s.shape)
    k = s.shape[1]
    w = _contrast_matrix(contrasts if contrasts is not None else [{i: 1.0} for i in range(k)], k)
    out = _bootstrap(s.shape[0], lambda c: _apply(w, np.exp((c @ s) / (c @ t))), w.shape[1],
                     n_resamples=n_resamples, seed=seed, confidence=1 - alpha, batch=batch)
    out["p"] = bootstrap_p(out["distribution"])
    return out


# ------------------------------------------------------------------------------ multiplicity
def holm(pvalues: Sequence[Optional[float]], alpha: float = ALPHA) -> tuple[list[Optional[float]], list[Optional[bool]]]:
    """Holm-adjusted p-values and rejections at ``alpha`` (statsmodels ``multipletests``).

    None/NaN entries stay None and do not count as tests.
    """
    from statsmodels.stats.multitest import multipletests

    p = [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in pvalues]
    idx = [i for i, v in enumerate(p) if v is not None]
    adj: list[Optional[float]] = [None] * len(p)
    rej: list[Optional[bool]] = [None] * len(p)
    if idx:
        r, pa, _, _ = multipletests([p[i] for i in idx], alpha=alpha, method="holm")
        for j, i in enumerate(idx):
            adj[i], rej[i] = float(pa[j]), bool(r[j])
    return adj, rej


# ------------------------------------------------------------------------------ power
def min_detectable_difference(n: int, discordance: float = DEFAULT_DISCORDANCE, alpha: float = ALPHA,
                              power: float = 0.8) -> Optional[float]:
    """The smallest accuracy difference a paired test on ``n`` items detects with ``power``.

    Model: two artefacts answer a fraction ``discordance`` (psi) of the items differently; the
    per-item difference d in {-1, 0, 1} has mean delta (the accuracy difference) and variance
    psi - delta^2. A two-sided one-sample t-test on d (asymptotically McNemar's test) has
    standardised effect ``e = delta / sqrt(psi - delta^2)``; statsmodels' ``TTestPower``
    solves for the e that reaches ``power`` at ``alpha`` with ``n`` items, and
    ``delta = e * sqrt(psi / (1 + e^2))``. A fraction in [0, 1]; None for fewer than 3 items.
    """
    if n < 3:
        return None
    if not 0 < discordance <= 1:
        raise DftError(f"discordance must be in (0, 1], got {discordance}")
    from statsmodels.stats.power import TTestPower

    # two-sided power is symmetric in e: the root finder may return -e (it does for n = 1525)
    e = abs(float(TTestPower().solve_power(effect_size=None, nobs=n, alpha=alpha, power=power,
                                           alternative="two-sided")))
    return min(1.0, e * math.sqrt(discordance / (1 + e * e)))


# ------------------------------------------------------------------------------ seeds
def seed_bootstrap_many(values: np.ndarray, n: Optional[np.ndarray] = None, *, n_resamples: int = N_RESAMPLES,
                        seed: int = SEED, alpha: float = ALPHA) -> dict:
    """Mean over training seeds with a two-level bootstrap interval, for many metrics at once.

    Args:
        values: ``[R, S]``: R metrics (rows) measured on each of S seeds (an accuracy: a
            fraction of ``n`` items).
        n: ``[R, S]`` items behind each value; None = resample seeds only (a metric without
            item-level data, e.g. perplexity here).

    Each resample draws S seeds with replacement (the same draws for every row: common random
    numbers, each row's interval is still its own bootstrap), then, with ``n``, each drawn seed's
    items with replacement. A seed drawn ``c`` times contributes ``c`` independent item resamples;
    the number correct of one resample of ``n`` items with ``k`` correct is Binomial(n, k/n)
    exactly, and the sum of ``c`` of them is Binomial(c*n, k/n), which is what is drawn
    (``numpy`` ``binomial``; Davison & Hinkley 1997, §3.8, for the two-stage scheme).
    Returns arrays over rows: ``mean``, ``ci_low``, ``ci_high`` (percentile, ``1 - alpha``),
    ``seed_sd`` (SD over seeds, ``ddof=1``; NaN for one seed: between-seed spread) and
    ``item_se`` (root mean square over seeds of ``sqrt(p(1-p)/n)``: the item-sampling spread of
    one seed's value; NaN without ``n``).
    """
    v = np.asarray(values, dtype=float)
    if v.ndim != 2 or v.shape[1] == 0:
        raise DftError(f"seed_bootstrap: values must be [metrics, seeds], got shape {v.shape}")
    R, S = v.shape
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_resamples, S), dtype=np.int64)  # how often each seed is drawn
    np.add.at(counts, (np.arange(n_resamples)[:, None], rng.integers(0, S, size=(n_resamples, S))), 1)
    if n is None:
        means = (counts @ v.T / S).T  # [R, B]
        item_se = np.full(R, np.nan)
    else:
        ns = np.broadcast_to(np.asarray(n, dtype=np.int64), v.shape)
        p = np.clip(v, 0, 1)
        means = np.empty((R, n_resamples))
        step = max(1, 2_000_000 // (n_resamples * S))  # rows per draw: ~16 MB of counts at a time
        for r0 in range(0, R, step):
            sl = slice(r0, r0 + step)
            draws = rng.binomial(counts[None, :, :] * ns[sl, None, :],
                                 np.broadcast_to(p[sl, None, :], (ns[sl].shape[0], n_resamples, S)))
            means[sl] = (draws / ns[sl, None, :]).sum(axis=2) / S
        item_se = np.sqrt(np.mean(p * (1 - p) / ns, axis=1))
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2], axis=1)
    sd = np.std(v, axis=1, ddof=1) if S > 1 else np.full(R, np.nan)
    return {"n_seeds": S, "mean": v.mean(axis=1), "ci_low": lo, "ci_high": hi, "seed_sd": sd, "item_se": item_se}


def seed_bootstrap(acc: Sequence[float], n: Sequence[int] | int, *, n_resamples: int = N_RESAMPLES,
                   seed: int = SEED, alpha: float = ALPHA, items: bool = True) -> dict:
    """:func:`seed_bootstrap_many` for one metric: floats, ``seed_sd``/``item_se`` None where
    undefined. ``items=False`` resamples seeds only."""
    v = _outcomes(acc)
    if v.size == 0:
        raise DftError("seed_bootstrap: no seed")
    r = seed_bootstrap_many(v[None, :], np.broadcast_to(np.asarray(n), v.shape)[None, :] if items else None,
                            n_resamples=n_resamples, seed=seed, alpha=alpha)

    def f(x):
        x = float(x[0])
        return None if math.isnan(x) else x

    return {"n_seeds": int(v.size), "mean": float(v.mean()), "ci_low": f(r["ci_low"]), "ci_high": f(r["ci_high"]),
            "seed_sd": f(r["seed_sd"]), "item_se": f(r["item_se"])}
