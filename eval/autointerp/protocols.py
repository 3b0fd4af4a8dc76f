"""The three protocols of SPEC.md section 6, selected by name: which records explain and which score.

| protocol | recording | explanation records | scoring records |
|---|---|---|---|
| tar    | 64-token windows, 8000 x 1024 tokens | top #0,2,4,6,8 | top #1,3,5,7,9 + random #0,2,4,6,8 |
| random | 64-token windows, 8000 x 1024 tokens | top #0,2,4,6,8 | random #0-9 |
| short  | 8-token windows, 800 x 1024 tokens   | top #0-14, quantile bins x #0,1, random #0-4 | top #15-24, quantile bins x #2,3, random #5-9, top #25-34 cut to their central 3 tokens |

Records that do not exist (a short stream, an empty quantile bin) are skipped, never invented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from crate.errors import CrateError
from crate.eval.record.windows import Window


@dataclass(frozen=True)
class Protocol:
    name: str
    window: int
    n_tokens: int
    records: str  # the records folder under <out>
    quantiles: bool = False  # whether it explains or scores with quantile-bin records (the recording's second pass)

    def split(self, w: dict[str, Any]) -> tuple[list[Window], list[Window]]:
        top, rnd, qs = w["top"], w["random"], w["quantile"]
        pick = lambda xs, idx: [xs[i] for i in idx if i < len(xs)]  # noqa: E731
        if self.name == "tar":
            return pick(top, range(0, 10, 2)), pick(top, range(1, 10, 2)) + pick(rnd, range(0, 10, 2))
        if self.name == "random":
            return pick(top, range(0, 10, 2)), pick(rnd, range(10))
        if self.name == "short":
            explain = pick(top, range(15)) + [x for b in qs for x in pick(b, (0, 1))] + pick(rnd, range(5))
            score = pick(top, range(15, 25)) + [x for b in qs for x in pick(b, (2, 3))] + pick(rnd, range(5, 10))
            score += [central(x, 3, f"top3:{x.id.split(':')[1]}") for x in pick(top, range(25, 35))]
            return explain, score
        raise CrateError(f"unknown protocol {self.name!r}")


def central(x: Window, n: int, rid: str) -> Window:
    """The n tokens around the record's centre (3 -> [c-1, c+2))."""
    lo = max(0, x.center - (n - 1) // 2)
    hi = min(len(x.tokens), lo + n)
    return Window(tokens=x.tokens[lo:hi], activations=x.activations[lo:hi], center=x.center - lo, id=rid,
                  position=x.position)


PROTOCOLS: dict[str, Protocol] = {
    "tar": Protocol("tar", window=64, n_tokens=8000 * 1024, records="records"),
    "random": Protocol("random", window=64, n_tokens=8000 * 1024, records="records"),
    "short": Protocol("short", window=8, n_tokens=800 * 1024, records="records-short", quantiles=True),
}
ALIASES = {"top-and-random": "tar", "random-only": "random", "anthropic": "short", "short-context": "short"}


def get_protocol(name: str) -> Protocol:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in PROTOCOLS:
        raise CrateError(f"unknown protocol {name!r}; choose one of {sorted(PROTOCOLS)} (aliases {sorted(ALIASES)})")
    return PROTOCOLS[key]


__all__ = ["Protocol", "PROTOCOLS", "get_protocol", "central"]
