"""The statistics of `crate study`'s verdicts (crate.eval.stats.claims): Holm and TOST against hand-computed cases
(and statsmodels' Holm where installed), the four verdicts on constructed seeds, and the family-wise error Holm
controls where uncorrected 95% readings do not."""

import math

import numpy as np
import pytest
from scipy.stats import t

from crate.eval.stats import claims as claim_stats
from crate.eval.stats import seeds as seed_stats


def test_holm_of_a_hand_computed_case():
    # sorted: 0.005 <= 0.05/4, 0.01 <= 0.05/3, then 0.03 > 0.05/2: stop (0.04 <= 0.05/1 is never reached);
    # adjusted: 4 * 0.005 = 0.02, 3 * 0.01 = 0.03, max(0.03, 2 * 0.03) = 0.06, max(0.06, 1 * 0.04) = 0.06
    reject, adjusted = claim_stats.holm([0.01, 0.04, 0.03, 0.005], alpha=0.05)
    assert reject == [True, False, False, True]
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # the first failure stops everything, even a p-value below alpha / 1 further on
    assert claim_stats.holm([0.03, 0.03, 0.049])[0] == [False, False, False]
    # a NaN (a test that could not run) is outside the family: m = 2 here, and it is never rejected
    reject, adjusted = claim_stats.holm([0.02, math.nan, 0.04])
    assert reject == [True, False, True] and adjusted[0] == pytest.approx(0.04) and math.isnan(adjusted[1])


def test_holm_matches_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    rng = np.random.default_rng(0)
    for m in (1, 2, 5, 14):  # multipletests takes some 40 ms a call: a few draws each
        for _ in range(4):
            p = rng.uniform(0, 0.1, m) ** rng.uniform(0.5, 2)
            reject, adjusted = claim_stats.holm(p, alpha=0.05)
            ref_reject, ref_adjusted, _, _ = multitest.multipletests(p, alpha=0.05, method="holm")
            assert reject == list(ref_reject) and adjusted == pytest.approx(list(ref_adjusted))


def test_welch_and_tost_of_a_hand_derived_case():
    # a = 10, 11, 12 (s^2/n = 1/3), b = 10, 10.5 (s^2/n = 0.125/2): d = 0.75, Welch-Satterthwaite df by hand
    a, b = [10.0, 11.0, 12.0], [10.0, 10.5]
    va, vb = 1 / 3, 0.0625
    d, se = 0.75, math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 1)
    half = t.ppf(0.95, df) * se  # the 90% interval TOST reads at alpha 0.05
    for margin in (2.0, 3.0):
        got = claim_stats.welch_tests(a, b, margin)
        assert got["difference"] == pytest.approx(d) and got["p"] == pytest.approx(2 * t.sf(d / se, df))
        assert got["ci_tost"] == pytest.approx([d - half, d + half])
        p_tost = max(t.sf((d + margin) / se, df), t.cdf((d - margin) / se, df))
        assert got["p_tost"] == pytest.approx(p_tost)
        # SPEC 6d: equivalent when the (1 - 2 alpha) interval lies inside [-margin, margin]; here 0.75 + 1.6 lies
        # outside a margin of 2 and inside one of 3, and TOST's p says the same
        inside = -margin < d - half and d + half < margin
        assert inside == (margin == 3.0) and (got["p_tost"] <= 0.05) == inside
    none = claim_stats.welch_tests(a, b)  # no margin: no equivalence test
    assert math.isnan(none["p_tost"]) and all(math.isnan(x) for x in none["ci_tost"])
    assert math.isnan(claim_stats.welch_tests([1.0], b, 2.0)["p"])  # one seed: no test


def _family(pairs, directions, margin):
    return claim_stats.read_family([claim_stats.welch_tests(a, b, margin) for a, b in pairs], directions)


def test_verdicts_on_constructed_seeds():
    rng = np.random.default_rng(1)
    high, low = rng.normal(70, 0.5, 5), rng.normal(50, 0.5, 5)
    same_a, same_b = rng.normal(50, 0.5, 5), rng.normal(50, 0.5, 5)
    # positive control: 20 points apart with small seed noise; reversed: the same gap against the claim; negative
    # control: identical distributions never hold, and with a margin of 5 they are equivalent
    read, family = _family([(high, low), (low, high), (same_a, same_b)], [1, 1, 1], 5.0)
    assert [r["verdict"] for r in read] == ["holds", "reversed", "equivalent"] and family == 6
    # the same null pair with a margin far inside its noise: neither holds nor equivalent
    wide_a, wide_b = rng.normal(50, 5, 3), rng.normal(50, 5, 3)
    read, _ = _family([(high, low), (wide_a, wide_b)], [1, 1], 0.5)
    assert read[1]["verdict"] == "not resolved"
    # a difference both significant and inside the margin reads as the difference it is
    read, _ = _family([(same_a + 1.5, same_b)], [1], 5.0)
    assert read[0]["verdict"] == "holds" and read[0]["p_tost_holm"] <= 0.05


def test_holm_turns_an_uncorrected_holds_into_not_resolved():
    # a = 3, 4, 5 against b = 0, 1, 2: d = 3, se = sqrt(2/3), t = 3.67 on 4 df, p = 0.021: its 95% Welch interval
    # excludes 0, but with two null claims beside it Holm asks p <= 0.05 / 3 = 0.0167
    claim = ([3.0, 4.0, 5.0], [0.0, 1.0, 2.0])
    assert seed_stats.verdict(*seed_stats.welch_interval(*claim), 1) == "holds"
    alone, _ = _family([claim], [1], None)
    assert alone[0]["verdict"] == "holds" and alone[0]["p"] == pytest.approx(2 * t.sf(3 / math.sqrt(2 / 3), 4))
    read, family = _family([claim, ([0.0, 1.0, 2.0], [0.5, 1.0, 1.5]), ([2.0, 0.0, 1.0], [1.0, 2.0, 0.0])],
                           [1, 1, -1], None)
    assert family == 3 and [r["verdict"] for r in read] == ["not resolved"] * 3
    assert read[0]["p_holm"] == pytest.approx(3 * read[0]["p"])


def test_holm_keeps_the_family_wise_error_where_95_percent_each_does_not():
    # 8 claims with no difference at all (3 seeds a side, seed sd 2): read at 95% each, at least one comes out holds or
    # reversed in about a third of the studies (1 - 0.95^8 = 0.34); Holm over the family keeps that under 5%
    rng = np.random.default_rng(2)
    corrected = uncorrected = 0
    for _ in range(300):
        pairs = [(rng.normal(50, 2, 3), rng.normal(50, 2, 3)) for _ in range(8)]
        read, _ = _family(pairs, [1] * 8, None)
        corrected += any(r["verdict"] in ("holds", "reversed") for r in read)
        uncorrected += any(r["p"] <= 0.05 for r in read)
    assert corrected / 300 <= 0.06 and uncorrected / 300 >= 0.2


def test_scorer_agreement_of_a_hand_computed_case_and_its_controls():
    from crate.eval.stats.agreement import scorer_agreement

    # x = 1..5, y = 2, 4, 5, 4, 5: Sxy = 6, Sxx = 10, Syy = 6, r = 6 / sqrt(60); Fisher's interval tanh(atanh(r) +-
    # 1.959964 / sqrt(n - 3)); the ranks of y are 1, 2.5, 4.5, 2.5, 4.5 (ties averaged): rho = 7 / sqrt(90)
    x, y = [1, 2, 3, 4, 5, math.nan, 2.0], [2, 4, 5, 4, 5, 1.0, math.inf]  # the last two are not scored by both
    a = scorer_agreement(x, y)
    r = 6 / math.sqrt(60)
    half = 1.959964 / math.sqrt(2)
    assert a["n"] == 5 and a["pearson"] == pytest.approx(r, rel=1e-12)
    assert a["pearson_ci95"] == pytest.approx((math.tanh(math.atanh(r) - half), math.tanh(math.atanh(r) + half)),
                                              rel=1e-5)
    assert a["spearman"] == pytest.approx(7 / math.sqrt(90), rel=1e-12)
    assert (a["mean_a"], a["mean_b"]) == pytest.approx((3.0, 4.0))
    # positive control: a scorer that is a monotone function of the other agrees perfectly
    rng = np.random.default_rng(0)
    u = rng.normal(size=200)
    perfect = scorer_agreement(u, 3 * u + 1)
    assert perfect["pearson"] == pytest.approx(1) and perfect["spearman"] == pytest.approx(1)
    assert scorer_agreement(u, np.exp(u))["spearman"] == pytest.approx(1)
    # negative control: independent scores; the interval holds 0
    none = scorer_agreement(rng.normal(size=4000), rng.normal(size=4000))
    assert none["pearson_ci95"][0] < 0 < none["pearson_ci95"][1] and abs(none["spearman"]) < 0.05
    # undefined: a constant scorer, or too few units
    assert math.isnan(scorer_agreement([1, 2, 3, 4], [5, 5, 5, 5])["pearson"])
    assert math.isnan(scorer_agreement([1, 2], [2, 1])["spearman"])
    with pytest.raises(ValueError, match="pair up"):
        scorer_agreement([1, 2, 3], [1, 2])
