"""moegrad.study.stats against numbers computed by hand in the test: sample sd, t-based 95%
confidence intervals, the paired t-test (p-values from the closed-form Student t CDF for
2, 4 and 5 degrees of freedom, t quantiles as literals from a t table) and Holm's correction."""

import math

import pytest

from moegrad.study.stats import (MIN_PAIRED, ci95, clean, compare_pairs, describe, holm,
                                 paired_t_test, sample_sd, t_quantile)

# two-sided 97.5% quantiles of Student's t from a table (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2)
T975 = {2: 4.302653, 4: 2.776445, 5: 2.570582, 7: 2.364624}


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| > |t|) from the closed forms of the Student t CDF (Abramowitz & Stegun 26.7.3/4):
    theta = atan(|t| / sqrt(df)); even df: A = sin(theta) (1 + cos^2/2 + 1*3/(2*4) cos^4 ...),
    odd df: A = 2/pi (theta + sin(theta) (cos + 2/3 cos^3 + ...)); p = 1 - A."""
    th = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(th), math.cos(th)
    if df == 2:
        a = s
    elif df == 4:
        a = s * (1 + c ** 2 / 2)
    elif df == 5:
        a = 2 / math.pi * (th + s * (c + 2 / 3 * c ** 3))
    else:
        raise NotImplementedError(df)
    return 1 - a


def test_t_quantile_matches_the_table_and_refuses_bad_input():
    for df, q in T975.items():
        assert t_quantile(0.975, df) == pytest.approx(q, abs=1e-6)
    with pytest.raises(ValueError, match="q=1.2"):
        t_quantile(1.2, 3)
    with pytest.raises(ValueError, match="df=0"):
        t_quantile(0.975, 0)


def test_sample_sd_and_ci95_by_hand():
    xs = [2, 4, 4, 4, 5, 5, 7, 9]  # mean 5, squared deviations sum to 32
    sd = math.sqrt(32 / 7)  # n - 1 = 7, not the population 32 / 8
    assert sample_sd(xs) == pytest.approx(sd, rel=1e-12)
    half = T975[7] * sd / math.sqrt(8)
    lo, hi = ci95(xs)
    assert (lo, hi) == (pytest.approx(5 - half, rel=1e-6), pytest.approx(5 + half, rel=1e-6))
    assert (lo, hi) == (pytest.approx(3.21252, abs=1e-4), pytest.approx(6.78748, abs=1e-4))
    assert sample_sd([1.0]) is None and ci95([1.0]) is None and sample_sd([]) is None


def test_describe_drops_missing_values_and_keeps_std_as_an_alias():
    d = describe([1.0, None, 3.0, float("nan")])
    assert d["n"] == 2 and d["mean"] == 2.0
    assert d["sd"] == pytest.approx(math.sqrt(2)) and d["std"] == d["sd"]
    assert d["ci95"] == [pytest.approx(2 - 12.706205 * 1.0), pytest.approx(2 + 12.706205 * 1.0)]
    assert d["values"][0] == 1.0 and d["values"][1] is None  # the raw per-seed values kept
    assert describe([None])["mean"] is None and describe([None])["n"] == 0
    assert clean([1, None, True, float("inf"), 2.5]) == [1.0, 2.5]


def test_paired_t_test_three_seeds_by_hand():
    a, b = [1.0, 2.0, 4.0], [0.5, 1.0, 2.5]  # d = 0.5, 1.0, 1.5
    r = paired_t_test(a, b)
    se = 0.5 / math.sqrt(3)  # sd of d = sqrt((0.25 + 0 + 0.25) / 2) = 0.5
    t = 1.0 / se  # = 2 sqrt(3)
    assert r["n"] == 3 and r["mean_diff"] == pytest.approx(1.0) and r["sd_diff"] == pytest.approx(0.5)
    assert r["t"] == pytest.approx(2 * math.sqrt(3), rel=1e-12)
    p = 1 - t / math.sqrt(2 + t * t)  # df = 2: P(|T| < t) = t / sqrt(2 + t^2)
    assert p == pytest.approx(0.074180, abs=1e-6)
    assert r["p"] == pytest.approx(p, rel=1e-9)
    assert r["ci95"] == [pytest.approx(1 - T975[2] * se, rel=1e-6),
                         pytest.approx(1 + T975[2] * se, rel=1e-6)]


def test_paired_t_test_five_and_six_seeds_by_hand():
    a = [3.0, 5.0, 7.0, 9.0, 11.0]
    b = [2.0, 3.0, 4.0, 5.0, 6.0]  # d = 1..5: mean 3, sd sqrt(2.5), se sqrt(0.5)
    r = paired_t_test(a, b)
    t = 3 / math.sqrt(0.5)
    assert r["t"] == pytest.approx(t, rel=1e-12)
    assert r["p"] == pytest.approx(t_two_sided_p(t, 4), rel=1e-9)
    assert r["p"] == pytest.approx(0.013236, abs=1e-5)
    assert r["ci95"][1] == pytest.approx(3 + T975[4] * math.sqrt(0.5), rel=1e-6)
    # sign: b - a gives the negated t and the same p
    back = paired_t_test(b, a)
    assert back["t"] == pytest.approx(-t) and back["p"] == pytest.approx(r["p"])
    # six seeds (df = 5, odd closed form); a missing value drops its pair
    d = [0.1, 0.4, 0.2, 0.3, 0.6, 0.2]
    r = paired_t_test([x + 1 for x in d] + [None], [1.0] * 6 + [2.0])
    m = sum(d) / 6
    s = math.sqrt(sum((x - m) ** 2 for x in d) / 5)
    t = m / (s / math.sqrt(6))
    assert r["n"] == 6 and r["t"] == pytest.approx(t, rel=1e-9)
    assert r["p"] == pytest.approx(t_two_sided_p(t, 5), rel=1e-7)


def test_paired_t_test_degenerate_cases():
    same = paired_t_test([0.3, 0.2, 0.1], [0.3, 0.2, 0.1])
    assert same["p"] == 1.0 and same["mean_diff"] == 0.0 and same["t"] is None
    shift = paired_t_test([1.5, 2.5, 3.5], [1.0, 2.0, 3.0])
    assert shift["p"] == 0.0 and shift["ci95"] == [0.5, 0.5]
    one = paired_t_test([1.0], [0.0])
    assert one["n"] == 1 and one["mean_diff"] == 1.0 and one["p"] is None and one["ci95"] is None
    with pytest.raises(ValueError, match="len\\(a\\)=2, len\\(b\\)=3"):
        paired_t_test([1, 2], [1, 2, 3])


def test_holm_by_hand():
    # sorted: 0.005 * 4 = 0.02, 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04 -> max so far 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # None is no test: m = 2
    out = holm([0.02, None, 0.04])
    assert out[1] is None and out[0] == pytest.approx(0.04) and out[2] == pytest.approx(0.04)
    assert holm([0.6, 0.7]) == [1.0, 1.0]  # capped at 1
    assert holm([]) == [] and holm([0.2]) == [0.2]


def test_compare_pairs_orients_on_the_baseline_and_corrects_per_metric():
    per_seed = {"topk": {0: 1.0, 1: 2.0, 2: 4.0},
                "dense": {0: 0.5, 1: 1.0, 2: 2.5},  # topk - dense = 0.5, 1.0, 1.5
                "gumbel": {0: 3.0, 1: 5.0, 2: None}}
    comps = compare_pairs(per_seed, "final_loss", ["topk", "dense", "gumbel"])
    assert [(c["a"], c["b"]) for c in comps] == [("dense", "topk"), ("gumbel", "topk"),
                                                  ("dense", "gumbel")]
    dense = comps[0]
    assert dense["mean_diff"] == pytest.approx(-1.0) and dense["tested"]
    p = 1 - (2 * math.sqrt(3)) / math.sqrt(14)  # the three-seed test above, mirrored
    assert dense["p"] == pytest.approx(p, rel=1e-9)
    # gumbel has 2 seeds with values: no test, and Holm's m counts only the tested pair
    for c in comps[1:]:
        assert c["n"] == 2 and not c["tested"] and c["p"] is None and c["p_holm"] is None
        assert not c["significant"]
    assert dense["p_holm"] == pytest.approx(p) and not dense["significant"]
    assert MIN_PAIRED == 3
