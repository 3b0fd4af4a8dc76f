"""The matched-loss reading (crate.eval.stats.matched): a training path read where its validation loss first falls
to a target, by hand-computed cases; the matched loss of two runs; no extrapolation."""

import math

import pytest

from crate.eval.stats.matched import matched_pair, score_at_loss


def test_score_at_loss_interpolates_linearly_in_the_loss_between_the_straddling_points():
    losses, scores = [5.0, 4.0, 3.5, 3.0], [10.0, 30.0, 40.0, 60.0]
    assert score_at_loss(losses, scores, 4.5) == pytest.approx(20.0)  # halfway from 5.0 to 4.0
    assert score_at_loss(losses, scores, 3.2) == pytest.approx(40.0 + 20.0 * 0.3 / 0.5)  # 52
    assert score_at_loss(losses, scores, 3.0) == pytest.approx(60.0)  # the last point itself
    assert score_at_loss(losses, scores, 5.0) == pytest.approx(10.0)  # the first point itself
    # no extrapolation: above the first point's loss (never that bad) or below the last (never that good)
    assert math.isnan(score_at_loss(losses, scores, 5.5)) and math.isnan(score_at_loss(losses, scores, 2.9))


def test_a_path_that_dips_and_rises_is_read_where_it_first_falls_to_the_target():
    losses, scores = [5.0, 3.0, 4.0, 3.5], [0.0, 40.0, 10.0, 20.0]
    assert score_at_loss(losses, scores, 4.0) == pytest.approx(20.0)  # between steps 1 and 2, not at step 3
    assert math.isnan(score_at_loss(losses, [0.0, math.nan, 10.0, 20.0], 4.0))  # a score it needs is missing
    # a path that starts below the target never falls to it, even if it rises above it and falls back later
    assert math.isnan(score_at_loss([3.0, 5.0, 3.5], [0.0, 10.0, 20.0], 4.0))
    with pytest.raises(ValueError, match="3 losses but 2 scores"):
        score_at_loss([1.0, 2.0, 3.0], [1.0, 2.0], 2.0)


def test_matched_pair_reads_both_runs_at_the_worse_final_loss():
    """GPT converges faster: its final loss (3.0) is below CRATE's (4.0), so both are read at 4.0, CRATE at its last
    point and GPT where its path passes 4.0 (between 5.0 at score 20 and 3.5 at score 80: 60)."""
    crate = [(6.0, 10.0), (5.0, 20.0), (4.0, 30.0)]
    gpt = [(5.0, 20.0), (3.5, 80.0), (3.0, 90.0)]
    assert matched_pair(crate, gpt) == {"loss": 4.0, "a": pytest.approx(30.0), "b": pytest.approx(60.0)}
    assert matched_pair(gpt, crate)["a"] == pytest.approx(60.0)  # symmetric
    # a faster system whose first point is already below the matched loss has no reading there (a finer grid has)
    fast = [(3.8, 70.0), (3.0, 90.0)]
    m = matched_pair(crate, fast)
    assert m["a"] == pytest.approx(30.0) and math.isnan(m["b"])
    assert math.isnan(matched_pair([], gpt)["loss"])
    # a run without a final loss has no matched reading, whichever side it is on
    for pair in ((crate, [(5.0, 20.0), (math.nan, 90.0)]), ([(5.0, 20.0), (math.nan, 90.0)], crate)):
        assert all(math.isnan(v) for v in matched_pair(*pair).values())
