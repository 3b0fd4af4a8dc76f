"""The intruder score (EleutherAI delphi, arXiv 2410.13928): with no explanation in the loop, a judge sees a few of a
unit's activating records and one record that does not activate it, and must name the odd one; the score is its
accuracy over the questions (chance 1/n). It asks whether a unit's contexts hang together, not whether an
explanation of them is right.

delphi (github.com/EleutherAI/delphi at 3c2e139; paths under delphi/):
- n examples per question: `n_examples_shown`, from RunConfig.num_examples_per_scorer_prompt = 5 (config.py:213);
  n - 1 activating ones and one intruder (scorers/classifier/intruder.py:165-170, 225-231).
- The activating ones: `record.test`, the latent's activating examples cut into 10 activation quantiles with 5
  drawn from each (latents/samplers.py:26-54, 99-110; config.py:14-17); each question draws its n - 1 from one
  quantile, cycling through the quantiles (intruder.py:154-170).
- The intruder: `record.not_active`, by default ("random", config.py:60) 32-token windows where the latent is zero
  throughout, drawn uniformly with replacement (latents/constructors.py:255-258, 643-683). Type "internal" takes
  another quantile's activating example instead (intruder.py:196-221).
- Highlighting: yes. Tokens of an activating example at >= 0.3 x its own maximum go in <<>>; the intruder gets as many
  decoy marks as the activating examples' mean number of active tokens (integer division), on its token at
  ctx_len - ctx_len // 4 (where the activating token sits in its windows) first, then random others
  (intruder.py:172-195; scorers/classifier/sample.py:87-184).
- Prompt: a system prompt ("intruder detection", "There is only ever one intruder in the examples", "You should
  write [RESPONSE]: followed by the index of the intruder"), three worked questions, then lines "Example {i}:{text}"
  numbered from 0 (scorers/classifier/prompts/intruder_prompt.py; intruder.py:268-280). The answer is generated
  (temperature 0) and parsed; one that cannot be parsed counts as wrong (intruder.py:282-317).
- Questions per latent: one per non-activating example (the zip over `not_active`, intruder.py:158-162),
  n_non_activating = 50 (config.py:51).
- Score: a question is right when the answer is the intruder's index (intruder.py:319-320): accuracy over the
  questions, chance 1/n.
- Seed: random.Random(42) (scorers/classifier/classifier.py:46; intruder.py:57) draws the examples shown
  (`rng.sample`), then the intruder's position (`rng.randint(0, n - 1)`, both ends included) (intruder.py:170, 226).

Ours, on one unit's scoring records (crate.eval.autointerp.steps `neuron_steps`), where we differ:
- The activating records are the scoring records where the unit is active (scoring.active_tokens: some token at
  normalised activation >= 1, the labels of detection), never the explanation records, pooled rather than one
  activation quantile per question: a scoring split holds about five of them, too few to split. The short
  protocol's "top3:*" records are left out: their 3 tokens against 8 would mark them as activating.
- The intruders are the uniformly sampled ("random:*") scoring records where the unit is inactive (delphi's default
  source), each used once in record order: one question per such record, so Q <= 5 under tar and short, <= 10
  under random-only. Inactive means below normalised 1 everywhere, not zero as for delphi's sparse latents: dense
  units seldom have a 64-token window that quiet, and their intruder score is then NaN.
- Marks as delphi's; the intruder's decoy marks start at its window's centre (the sampled position).
- The judge gives a probability per choice (an LLM: read at one slot, as the simulator reads digits) and the answer
  is the most probable (ties: the first); a judge with no mass on any choice is wrong, as an unparsable answer is.
- One seeded random.Random per unit (`seed`: steps.neuron_seed) draws, per question, the records shown, then the
  intruder's position, then its decoy marks.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from crate.eval.autointerp.scoring import RANDOM_PREFIX
from crate.eval.record.windows import Window

N_CHOICES = 5  # delphi's num_examples_per_scorer_prompt: 4 activating records and the intruder
MARK_THRESHOLD = 0.3  # delphi: a token is marked at >= 0.3 x its record's maximum
CUT_PREFIX = "top3:"  # the short protocol's records cut to 3 tokens


@dataclass(frozen=True)
class Question:
    """One question: the records in the order shown, the intruder's index among them, and each record's marks."""

    records: list[Window]
    intruder: int
    marks: list[list[bool]]


def active_marks(record: Window) -> list[bool]:
    """delphi's marks on an activating record: its tokens at >= 0.3 x the record's maximum."""
    top = max(record.activations)
    return [a >= MARK_THRESHOLD * top for a in record.activations]


def decoy_marks(record: Window, k: int, rng: random.Random) -> list[bool]:
    """k >= 1 marks on an inactive record, as many as an activating record has on average: its centre first (where a
    window's sampled position sits, as delphi's activating token sits at a fixed place), then k - 1 at random."""
    n = len(record.tokens)
    first = [record.center] if 0 <= record.center < n else []
    rest = [j for j in range(n) if j != record.center]
    chosen = set(first) | set(rng.sample(rest, min(len(rest), k - len(first))))
    return [j in chosen for j in range(n)]


def intruder_questions(records: Sequence[Window], active: Sequence[bool], seed: int,
                       n: int = N_CHOICES) -> list[Question]:
    """The questions of one unit: one per inactive uniformly sampled record (the intruder), each with n - 1 records
    drawn from the active ones (`active`, per record) and the intruder at a seeded position; none when fewer than
    n - 1 records are active or no uniformly sampled one is inactive."""
    if not 2 <= n <= 10:
        raise ValueError(f"an intruder question has 2 to 10 choices (one digit each), not {n}")
    real = [r for r, a in zip(records, active) if a and not r.id.startswith(CUT_PREFIX)]
    pool = [r for r, a in zip(records, active) if not a and r.id.startswith(RANDOM_PREFIX)]
    if len(real) < n - 1 or not pool:
        return []
    rng = random.Random(seed)
    out = []
    for intruder in pool:
        shown = rng.sample(real, n - 1)
        pos = rng.randint(0, n - 1)
        marks = [active_marks(r) for r in shown]
        decoy = decoy_marks(intruder, max(1, sum(map(sum, marks)) // (n - 1)), rng)
        out.append(Question(shown[:pos] + [intruder] + shown[pos:], pos, marks[:pos] + [decoy] + marks[pos:]))
    return out


def intruder_accuracy(intruders: Sequence[int], probabilities: Sequence[Sequence[float]]) -> float:
    """The share of questions whose most probable choice (ties: the first) is the intruder; a question with no
    probability on any choice is wrong. NaN without questions."""
    if len(intruders) != len(probabilities):
        raise ValueError(f"{len(intruders)} questions but {len(probabilities)} answers")
    if not intruders:
        return math.nan
    right = [max(p) > 0 and int(np.argmax(p)) == i for i, p in zip(intruders, probabilities)]
    return float(np.mean(right))


__all__ = ["N_CHOICES", "MARK_THRESHOLD", "CUT_PREFIX", "Question", "active_marks", "decoy_marks",
           "intruder_questions", "intruder_accuracy"]
