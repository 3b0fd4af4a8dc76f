"""Flags on verdicts the scorer's own controls cannot support (crate.eval.validity.flags): each rule on constructed
validity summaries where the answer is known both ways."""

import pytest

from crate.eval.validity.flags import (
    CONFOUNDED_SHARE, DENSITY_MIN, INDICATOR_MIN, NOISE_MAX, OWN_DENSITY, comparison_flags, model_flags,
)


def _validity(indicator=1.0, noise=(-0.05, 0.05), own=0.9, density=0.1, dead=0, units=100):
    fam = lambda mean, ci: {"score": {"mean": mean, "ci95": list(ci), "n": 4, "n_nan": 0}}  # noqa: E731
    return {"planted": {"own_density": density, "families": {
        "indicator-1": fam(indicator, (indicator, indicator)), "noise-dense": fam(sum(noise) / 2, noise),
        "noise-sparse": fam(0.0, (-0.02, 0.02)), OWN_DENSITY: fam(own, (own - 0.05, own + 0.05))}},
        "layers": {"0": {"counts": {"n_units": units, "dead": dead}}}}


def test_a_model_that_passes_its_controls_has_no_flag():
    assert model_flags(_validity()) == []


@pytest.mark.parametrize("kw,flag", [
    (dict(indicator=INDICATOR_MIN - 0.01), "indicator"),
    (dict(noise=(NOISE_MAX + 0.01, 0.4)), "noise"),
    (dict(own=DENSITY_MIN - 0.01, density=0.43), "density"),
])
def test_each_failed_control_flags_the_model_with_its_numbers(kw, flag):
    flags = model_flags(_validity(**kw))
    assert [f["flag"] for f in flags] == [flag]
    if flag == "density":
        assert "43%" in flags[0]["reason"] and "49.0" in flags[0]["reason"]


def test_at_the_threshold_nothing_is_flagged():
    assert model_flags(_validity(indicator=INDICATOR_MIN, noise=(NOISE_MAX, 0.3), own=DENSITY_MIN)) == []


def test_a_gap_the_density_bias_explains_is_flagged():
    # CRATE denser: its planted lookups score 0.70, GPT's 0.90; CRATE - GPT = -0.15: the bias (-0.20) is larger
    crate, gpt = _validity(own=0.70, density=0.43), _validity(own=0.90, density=0.17)
    flags = comparison_flags(crate, gpt, -0.15, ("crate", "gpt"))
    assert [f["flag"] for f in flags] == ["density-confounded"]
    assert "crate's density (43%)" in flags[0]["reason"] and "-20.0" in flags[0]["reason"]


def test_a_gap_much_larger_than_the_bias_or_against_it_is_not_flagged():
    crate, gpt = _validity(own=0.70), _validity(own=0.90)
    bias = -0.20
    assert comparison_flags(crate, gpt, bias / CONFOUNDED_SHARE - 0.01, ("crate", "gpt")) == []  # bias < half the gap
    assert comparison_flags(crate, gpt, +0.15, ("crate", "gpt")) == []  # the gap goes against the bias
    assert comparison_flags(crate, gpt, bias / CONFOUNDED_SHARE, ("crate", "gpt"))  # exactly half: flagged


def test_different_dead_shares_flag_the_populations_and_a_missing_summary_flags_nothing():
    flags = comparison_flags(_validity(dead=17), _validity(dead=0), 0.3, ("crate", "gpt"))
    assert [f["flag"] for f in flags] == ["populations"] and "17% of crate's units" in flags[0]["reason"]
    assert comparison_flags(_validity(dead=17), {}, 0.3) == [] and comparison_flags(None, _validity(), 0.3) == []
