"""Statistics for comparing runs across seeds, in numpy and math only (no scipy at run time).

The Student t distribution comes from the regularized incomplete beta function, evaluated by its
continued fraction (modified Lentz), the same route the usual libraries take; tests/test_stats.py
checks it against reference values. Conventions follow scipy's: `welch_t(a, b)` and `paired_t(a, b)`
test mean(a) - mean(b); `compare(baseline, variant)` reports variant - baseline. Scores are losses:
lower is better.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

VERDICTS = ("better", "worse", "inside noise")


def _arr(xs: Sequence[float], name: str = "sample") -> np.ndarray:
    a = np.asarray(xs, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    return a


# ----------------------------------------------------------------------------- distributions
def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b) (Numerical Recipes' form), by the modified Lentz method."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        # even step, then odd step of the fraction
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1.0) < 1e-16:
            return h
    raise ArithmeticError(f"incomplete beta did not converge for a={a} b={b} x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc: a={a} and b={b} must be positive")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # the fraction converges fast only for x below the mean; use the symmetry I_x(a,b) = 1 - I_{1-x}(b,a) above it
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_sf2(t: float, df: float) -> float:
    """Two-sided tail P(|T| >= |t|) of Student's t with df degrees of freedom (df may be fractional)."""
    if math.isnan(t) or math.isnan(df):
        return math.nan
    if math.isinf(t):
        return 0.0
    if math.isinf(df) or df > 1e7:  # the normal limit; the beta form loses precision there
        return math.erfc(abs(t) / math.sqrt(2.0))
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_cdf(t: float, df: float) -> float:
    tail = 0.5 * t_sf2(t, df)
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The q-quantile of Student's t, by bisection on t_cdf (monotone, so this cannot fail)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"t_ppf: q={q} must be in (0, 1)")
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > q:
        lo *= 2.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * (1.0 + abs(mid)):
            break
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------- summaries
def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; nan for a single value: one seed says nothing of noise)."""
    a = _arr(xs)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else math.nan


def mean_ci(xs: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the Student t interval of the mean; the bounds are nan below two values."""
    a = _arr(xs)
    m = float(a.mean())
    if a.size < 2:
        return m, math.nan, math.nan
    half = t_ppf(0.5 + level / 2.0, a.size - 1) * float(a.std(ddof=1)) / math.sqrt(a.size)
    return m, m - half, m + half


def _t_result(diff: float, se: float, df: float) -> tuple[float, float, float]:
    if se == 0.0:  # identical values: no evidence either way, or infinitely strong
        return (0.0, df, 1.0) if diff == 0.0 else (math.copysign(math.inf, diff), df, 0.0)
    t = diff / se
    return t, df, t_sf2(t, df)


def welch_t(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Welch's unequal-variance t test of mean(a) - mean(b): (t, Welch-Satterthwaite df, two-sided p)."""
    a, b = _arr(a, "a"), _arr(b, "b")
    if a.size < 2 or b.size < 2:
        raise ValueError(f"welch_t needs two values per sample (got {a.size} and {b.size})")
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1)) if se > 0 else float(a.size + b.size - 2)
    return _t_result(float(a.mean() - b.mean()), se, df)


def paired_t(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Paired t test of mean(a - b), a[i] and b[i] from the same seed: (t, n - 1, two-sided p)."""
    a, b = _arr(a, "a"), _arr(b, "b")
    if a.size != b.size or a.size < 2:
        raise ValueError(f"paired_t needs two equal-length samples of at least 2 (got {a.size} and {b.size})")
    d = a - b
    return _t_result(float(d.mean()), float(d.std(ddof=1)) / math.sqrt(d.size), float(d.size - 1))


def cohens_d(a: Sequence[float], b: Sequence[float], paired: bool = False) -> float:
    """(mean(a) - mean(b)) / pooled sd; paired: mean(a - b) / sd(a - b) (d_z)."""
    a, b = _arr(a, "a"), _arr(b, "b")
    if paired:
        if a.size != b.size:
            raise ValueError(f"paired cohens_d needs equal lengths (got {a.size} and {b.size})")
        diff, sd = float((a - b).mean()), float((a - b).std(ddof=1)) if a.size > 1 else math.nan
    else:
        dof = a.size + b.size - 2
        squares = sum((x.size - 1) * x.var(ddof=1) for x in (a, b) if x.size > 1)
        diff, sd = float(a.mean() - b.mean()), math.sqrt(squares / dof) if dof > 0 else math.nan
    if math.isnan(sd):
        return math.nan
    if sd == 0.0:
        return 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
    return diff / sd


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order; nan entries stay nan and do not count."""
    p = [float(x) for x in pvalues]
    order = sorted((i for i, x in enumerate(p) if not math.isnan(x)), key=lambda i: p[i])
    m, running, out = len(order), 0.0, [math.nan] * len(p)
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))  # step-down: never below an earlier one
        out[i] = running
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Spearman's rank correlation (ties get average ranks) and its two-sided p (t with n - 2 df)."""
    x, y = _arr(x, "x"), _arr(y, "y")
    if x.size != y.size:
        raise ValueError(f"spearman needs equal lengths (got {x.size} and {y.size})")
    rx, ry = _ranks(x), _ranks(y)
    if x.size < 2 or rx.std() == 0 or ry.std() == 0:
        return math.nan, math.nan
    rho = float(np.corrcoef(rx, ry)[0, 1])
    if x.size < 3:
        return rho, math.nan
    if abs(rho) >= 1.0:
        return math.copysign(1.0, rho), 0.0
    df = x.size - 2
    return rho, t_sf2(rho * math.sqrt(df / (1.0 - rho * rho)), df)


def _ranks(a: np.ndarray) -> np.ndarray:
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(a.size)
    ranks[order] = np.arange(1, a.size + 1)
    for value in np.unique(a):  # ties share the mean of their ranks
        tied = a == value
        ranks[tied] = ranks[tied].mean()
    return ranks


# ----------------------------------------------------------------------------- verdicts
def verdict(delta: float, p: float, min_effect: float, alpha: float) -> tuple[str, str]:
    """'better' / 'worse' only when the change is at least min_effect AND p < alpha; otherwise
    'inside noise', with the reason (not significant, or significant but smaller than the minimum)."""
    if math.isnan(p) or math.isnan(delta):
        return "inside noise", "no p-value (fewer than two seeds)"
    if p >= alpha:
        return "inside noise", f"p={p:.3g} >= {alpha:g}"
    if abs(delta) < min_effect:
        return "inside noise", f"p={p:.3g} < {alpha:g} but |delta|={abs(delta):.4g} < minimum effect {min_effect:g}"
    label = "better" if delta < 0 else "worse"
    return label, f"|delta|={abs(delta):.4g} >= {min_effect:g} at p={p:.3g} < {alpha:g}"


def compare(baseline: Sequence[float], variant: Sequence[float], paired: bool = False,
            min_effect: float = 0.005, alpha: float = 0.01, level: float = 0.95) -> dict:
    """Variant vs baseline on a loss (lower is better): delta = mean(variant) - mean(baseline), its
    t interval, t test (paired by seed when `paired`, the i-th values sharing a seed; else Welch),
    Cohen's d and a verdict with its reason."""
    base, var = _arr(baseline, "baseline"), _arr(variant, "variant")
    out = {"n_baseline": int(base.size), "n_variant": int(var.size), "paired": paired,
           "mean_baseline": float(base.mean()), "mean_variant": float(var.mean()),
           "delta": float(var.mean() - base.mean()), "delta_ci": (math.nan, math.nan),
           "t": math.nan, "df": math.nan, "p": math.nan, "d": math.nan,
           "min_effect": min_effect, "alpha": alpha}
    enough = base.size >= 2 and var.size >= 2
    if paired and enough:
        out["t"], out["df"], out["p"] = paired_t(var, base)
        _, lo, hi = mean_ci(var - base, level)
        out["delta_ci"], out["d"] = (lo, hi), cohens_d(var, base, paired=True)
    elif enough:
        out["t"], out["df"], out["p"] = welch_t(var, base)
        se = math.sqrt(var.var(ddof=1) / var.size + base.var(ddof=1) / base.size)
        half = t_ppf(0.5 + level / 2.0, out["df"]) * se
        out["delta_ci"], out["d"] = (out["delta"] - half, out["delta"] + half), cohens_d(var, base)
    out["verdict"], out["reason"] = verdict(out["delta"], out["p"], min_effect, alpha)
    return out
