"""The intruder score (delphi): which records a question shows, its marks, the judges' answers and the line's
accuracy, against hand-computed numbers, a fake LLM that knows the answer, and controls for the LLM-free judge."""

import math
import random

import numpy as np
import pytest

from crate.eval.autointerp.explainers import STATS_PREFIX, StatsExplainer
from crate.eval.autointerp.intruder import (
    N_CHOICES, active_marks, decoy_marks, intruder_accuracy, intruder_questions,
)
from crate.eval.autointerp.prompts import DIGITS, YES_NO, highlight, intruder_prompt, normalise
from crate.eval.autointerp.protocols import get_protocol
from crate.eval.autointerp.scoring import active_tokens
from crate.eval.autointerp.simulators import LLMSimulator, StatsSimulator
from crate.eval.autointerp.steps import neuron_steps, score_neuron
from crate.eval.record.windows import Window

FILLER = [" the", " a", " of", " and", " to", " in", " is", " it", " on", " at"]


def _record(rid: str, rng: random.Random, word: str | None, n: int = 8) -> Window:
    """Filler tokens; with `word`, one of them replaced by it, the only token where the unit fires."""
    tokens, acts = [rng.choice(FILLER) for _ in range(n)], [0.0] * n
    if word is not None:
        j = rng.randrange(n)
        tokens[j], acts[j] = word, 5.0
    return Window(tokens=tokens, activations=acts, center=n // 2, id=rid)


def _cat_unit(n_top: int = 10, n_random: int = 10, seed: int = 0) -> dict:
    """Fires on " cat" in every top record; the uniformly sampled records hold no cat and are silent."""
    rng = random.Random(seed)
    return {"top": [_record(f"top:{i}", rng, " cat") for i in range(n_top)],
            "random": [_record(f"random:{i}", rng, None) for i in range(n_random)], "quantile": []}


def _split_questions(windows: dict, protocol: str = "tar", seed: int = 0):
    explain, score = get_protocol(protocol).split(windows)
    m = max(a for r in explain for a in r.activations)
    labels = [any(a) for a in active_tokens([r.activations for r in score], m)]
    return explain, score, intruder_questions(score, labels, seed)


def test_questions_show_active_scoring_records_and_one_inactive_random_intruder_each():
    explain, score, qs = _split_questions(_cat_unit(), seed=7)
    explain_ids = {r.id for r in explain}
    # tar scores top #1,3,5,7,9 (all active) and random #0,2,4,6,8 (all silent): one question per silent one
    assert [q.records[q.intruder].id for q in qs] == ["random:0", "random:2", "random:4", "random:6", "random:8"]
    for q in qs:
        assert len(q.records) == N_CHOICES == len(q.marks) and len({r.id for r in q.records}) == N_CHOICES
        for i, r in enumerate(q.records):
            assert r.id not in explain_ids
            fires = any(v >= 1 for v in normalise(r.activations, 5.0))
            assert fires == (i != q.intruder) and (" cat" in r.tokens) == fires
    # determinism: the same seed gives the same questions; another seed other draws
    again = _split_questions(_cat_unit(), seed=7)[2]
    assert again == qs
    other = _split_questions(_cat_unit(), seed=8)[2]
    assert [(q.intruder, [r.id for r in q.records]) for q in other] != [(q.intruder, [r.id for r in q.records]) for q in qs]


def test_no_question_without_enough_activating_records_or_a_silent_random_one():
    rng = random.Random(1)
    few = _cat_unit()
    for i in (3, 5, 7, 9):  # tar's scoring top records: only top:1 still fires, fewer than N_CHOICES - 1
        few["top"][i] = _record(f"top:{i}", rng, None)
    assert _split_questions(few)[2] == []
    busy = _cat_unit()
    busy["random"] = [_record(f"random:{i}", rng, " cat") for i in range(10)]  # every sampled record fires
    assert _split_questions(busy)[2] == []
    for windows in (few, busy):
        line = score_neuron(windows, get_protocol("tar"), StatsExplainer(), StatsSimulator())
        assert math.isnan(line["intruder"]) and line["intruder_chance"] == pytest.approx(1 / N_CHOICES)
    with pytest.raises(ValueError):
        intruder_questions([], [], seed=0, n=11)


def test_short_protocol_leaves_out_the_records_cut_to_three_tokens():
    rng = random.Random(2)
    windows = {"top": [_record(f"top:{i}", rng, " cat") for i in range(35)],
               "random": [_record(f"random:{i}", rng, None) for i in range(10)], "quantile": []}
    _, score, qs = _split_questions(windows, "short")
    assert any(r.id.startswith("top3:") for r in score) and len(qs) == 5  # random #5-9
    shown = {r.id for q in qs for r in q.records}
    assert not any(x.startswith("top3:") for x in shown) and any(x.startswith("top:") for x in shown)


def test_marks_hand_computed():
    w = Window(tokens=list("abcde"), activations=[0.1, 0.3, 1.0, 0.29, 0.0], center=2, id="top:0")
    assert active_marks(w) == [False, True, True, False, False]  # >= 0.3 x the record's maximum 1.0
    assert decoy_marks(w, 1, random.Random(0)) == [False, False, True, False, False]  # the centre alone
    three = decoy_marks(w, 3, random.Random(0))
    assert sum(three) == 3 and three[2]
    edge = Window(tokens=list("ab"), activations=[0.0, 0.0], center=-1, id="random:0")
    assert decoy_marks(edge, 1, random.Random(0)).count(True) == 1 and decoy_marks(edge, 5, random.Random(0)) == [True] * 2
    # in a question: each real record has 3 marked tokens, so the intruder gets 3 * 4 // 4 = 3, its centre among them
    real = [Window(list("abcdefgh"), [0, 9, 9, 9, 0, 0, 0, 0.0], 4, f"top:{i}") for i in range(4)]
    silent = Window(list("abcdefgh"), [0.0] * 8, 4, "random:0")
    (q,) = intruder_questions(real + [silent], [True] * 4 + [False], seed=3)
    assert sum(q.marks[q.intruder]) == 3 and q.marks[q.intruder][4]
    assert all(m == [False, True, True, True, False, False, False, False] for i, m in enumerate(q.marks) if i != q.intruder)


def test_intruder_accuracy_hand_computed():
    probs = [[0.6, 0.4, 0.0], [0.2, 0.3, 0.5], [0.0, 0.0, 0.0], [0.5, 0.5, 0.0]]
    # right, right, no mass (wrong), tie read as the first (wrong: the intruder is the second)
    assert intruder_accuracy([0, 2, 1, 1], probs) == pytest.approx(2 / 4)
    assert intruder_accuracy([0], [[0.5, 0.5]]) == 1.0
    assert math.isnan(intruder_accuracy([], []))
    with pytest.raises(ValueError):
        intruder_accuracy([0, 1], [[1.0, 0.0]])


def test_highlight_and_prompt_hand_written():
    assert highlight(["a", " b", " c", "\nd"], [False, True, True, False]) == "a<< b c>> d"
    assert highlight(["a", "b"], [False, True]) == "a<<b>>"
    text, last = intruder_prompt([["x", " cat"], [" dog"]], [[False, True], [True]])
    assert last == "" and text.endswith("Examples:\n\nExample #0: x<< cat>>\nExample #1: << dog>>\n\n[RESPONSE]: #")
    assert "[RESPONSE]: #2\n\n" in text and "intruder" in text


class _IntruderLLM:
    """A fake LLM. Intruder prompts: `mode` "truth" puts most mass on the shown example holding " dog" (only the
    silent records do) and "zero" on "0"; both record the index the dog was shown at. Other prompts: no mass."""

    identity = {"backend": "fake-intruder"}

    def __init__(self, mode: str):
        self.mode, self.positions, self.prompts = mode, [], []

    def slot_probs(self, prompts, candidates):
        out = []
        for pieces in prompts:
            p = np.zeros((len(pieces) - 1, len(candidates)))
            if "intruder detection" in pieces[0]:
                self.prompts.append(pieces[0])
                lines = [x for x in pieces[0].rsplit("Examples:", 1)[1].splitlines() if x.startswith("Example #")]
                dog = next(i for i, x in enumerate(lines) if "dog" in x)
                self.positions.append(dog)
                answer = str(dog) if self.mode == "truth" else "0"
                p[0, :len(lines)] = 0.1
                p[0, candidates.index(answer)] = 0.6
                p[0, candidates.index("9")] = 0.3  # not a choice: ignored
            out.append(p)
        return out


def _dog_unit() -> dict:
    w = _cat_unit(seed=4)
    for r in w["random"]:
        r.tokens[0] = " dog"
    return w


def test_fake_llm_judge_known_answers_and_no_explanation_in_the_prompt():
    tar = get_protocol("tar")
    truth = _IntruderLLM("truth")
    line = score_neuron(_dog_unit(), tar, StatsExplainer(), LLMSimulator(truth), seed=5)
    assert line["intruder"] == 1.0 and line["intruder_chance"] == pytest.approx(0.2)
    assert len(truth.prompts) == 5
    for p in truth.prompts:  # the explanation is never shown
        assert line["explanation"].startswith(STATS_PREFIX) and line["explanation"] not in p and STATS_PREFIX not in p
    zero = _IntruderLLM("zero")
    line0 = score_neuron(_dog_unit(), tar, StatsExplainer(), LLMSimulator(zero), seed=5)
    assert zero.positions == truth.positions and len(set(zero.positions)) > 1  # seeded, and not all at one place
    assert line0["intruder"] == pytest.approx(zero.positions.count(0) / len(zero.positions))
    # the positions shown are the questions' own
    _, _, qs = _split_questions(_dog_unit(), seed=5)
    assert [q.intruder for q in qs] == truth.positions


def test_llm_simulator_renormalises_over_the_choices():
    class _Fixed:
        identity = {"backend": "fixed"}

        def slot_probs(self, prompts, candidates):
            assert list(candidates) == DIGITS + YES_NO
            rows = [[0.05, 0.1, 0.05, 0.2, 0.1] + [0.5] * 6 + [0.0, 0.0], [0.0] * 13]
            return [np.asarray([rows[i % 2]]) for i in range(len(prompts))]

    q = [[" a"], [" b"], [" c"], [" d"], [" e"]]
    got = LLMSimulator(_Fixed()).intruder([q, q], [[[True]] * 5] * 2)
    assert got[0] == pytest.approx([0.1, 0.2, 0.1, 0.4, 0.2]) and got[1] == [0.0] * 5


def test_intruder_request_is_batched_with_the_others_and_only_with_extra_scores():
    tar = get_protocol("tar")
    for extra, methods in ((True, ["simulate", "detect", "fuzz", "intruder"]), (False, ["simulate"])):
        steps = neuron_steps(_cat_unit(), tar, seed=0, extra_scores=extra)
        assert [m for _, m, _ in next(steps)] == ["explain"]
        assert [m for _, m, _ in steps.send(["cats"])] == methods
    line = score_neuron(_cat_unit(), tar, StatsExplainer(), StatsSimulator(), extra_scores=False)
    assert line["intruder"] is None and line["intruder_chance"] is None


def test_stats_judge_positive_control_scores_one():
    # real records all hold " cat" (marked), the intruder none: it shares no marked key with the others
    line = score_neuron(_cat_unit(seed=6), get_protocol("tar"), StatsExplainer(), StatsSimulator(), seed=1)
    assert line["intruder"] == 1.0
    q = [[" cat", " x"], [" y", " cat"], [" dog", " z"], [" cat"], [" cat", " w"]]
    marks = [[True, False], [False, True], [True, False], [True], [True, False]]
    assert StatsSimulator().intruder([q], [marks]) == [[0.0, 0.0, 1.0, 0.0, 0.0]]


def test_stats_judge_negative_control_is_about_chance():
    # every record fires on one filler token at random, the intruders get a random decoy mark: nothing tells them
    # apart, so over 400 questions the judge should be near 1/5 (binomial s.d. 0.02)
    rng = random.Random(9)
    active = [_record(f"top:{i}", rng, rng.choice(FILLER)) for i in range(12)]
    silent = [_record(f"random:{i}", rng, None) for i in range(400)]
    qs = intruder_questions(active + silent, [True] * 12 + [False] * 400, seed=2)
    probs = StatsSimulator().intruder([[r.tokens for r in q.records] for q in qs], [q.marks for q in qs])
    acc = intruder_accuracy([q.intruder for q in qs], probs)
    assert len(qs) == 400 and abs(acc - 1 / N_CHOICES) < 0.08
