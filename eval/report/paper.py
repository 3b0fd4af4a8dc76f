"""The paper's numbers and names (Bai & Ma, arXiv 2410.16443; SPEC.md sections 4, 6 and 6a), in one place: every
report compares against them and shows protocols and systems under these names, in this order."""

from __future__ import annotations

# crate.eval.autointerp.protocols' names -> the names the reports show (the paper's)
PROTOCOL_LABELS = {"tar": "TaR", "random": "Random-only", "short": "short-context"}
PROTOCOLS = tuple(PROTOCOL_LABELS.values())
PROTOCOL_ALIASES = {
    **PROTOCOL_LABELS, "top_and_random": "TaR", "top-and-random": "TaR", "topandrandom": "TaR",
    "random_only": "Random-only", "random-only": "Random-only", "randomonly": "Random-only",
    "short_context": "short-context", "short-context": "short-context", "shortcontext": "short-context",
    "anthropic": "short-context",
}
SYSTEM_LABELS = {"crate": "CRATE", "gpt": "GPT", "gpt-sae": "GPT-SAE"}  # arch -> the name the reports show
ARCH_ORDER = tuple(SYSTEM_LABELS)
PAPER_ARCHS = ("crate", "gpt")  # the order of PAPER_SCORES' pairs
# Rows of the paper's table; our presets S and B are its 6L and 12L models.
PAPER_ROW = {"1L": "1L", "2L": "2L", "3L": "3L", "S": "6L", "B": "12L"}
PAPER_SCORES: dict[tuple[str, str], tuple[float, float]] = {  # (row, protocol) -> (CRATE, GPT), mean x100
    ("1L", "TaR"): (3.9, 8.8), ("1L", "Random-only"): (4.8, 8.9), ("1L", "short-context"): (10.1, 14.2),
    ("2L", "TaR"): (8.05, 4.2), ("2L", "Random-only"): (6.95, 1.95), ("2L", "short-context"): (11.35, 10.2),
    ("3L", "TaR"): (9.1, 3.57), ("3L", "Random-only"): (8.43, 1.37), ("3L", "short-context"): (11.23, 9.2),
    ("6L", "TaR"): (7.96, 5.4), ("6L", "Random-only"): (6.36, 3.14), ("6L", "short-context"): (10.4, 8.52),
    ("12L", "TaR"): (6.8, 6.34), ("12L", "Random-only"): (5.12, 2.67), ("12L", "short-context"): (8.88, 8.65),
}
PAPER_VARIANCE: dict[tuple[str, str], tuple[float, float]] = {("6L", "TaR"): (2.29, 20.85), ("12L", "TaR"): (7.09, 11.35)}
PAPER_VAL_LOSS: dict[str, tuple[float, float]] = {  # preset -> (CRATE, GPT), read off the paper's figure
    "1L": (4.06, 3.83), "2L": (3.55, 3.23), "3L": (3.46, 3.11), "S": (2.36, 2.16), "B": (2.27, 2.13),
}
# GPT-SAE per-layer scores (x100, layer 0 first) that the paper plots (SPEC.md 6a; Random-only and some others are
# read off a figure, +-0.1)
PAPER_SAE_LAYERS: dict[tuple[str, str], tuple[float, ...]] = {
    ("1L", "TaR"): (5.5,), ("2L", "TaR"): (7.6, 3.5), ("3L", "TaR"): (9.4, 4.9, 3.5),
    ("1L", "Random-only"): (2.5,), ("2L", "Random-only"): (2.6, 1.9), ("3L", "Random-only"): (2.8, 2.4, 1.8),
    ("1L", "short-context"): (15.4,), ("2L", "short-context"): (21.7, 10.7), ("3L", "short-context"): (25.5, 15.1, 10.1),
}


def canonical_protocol(name: str) -> str:
    return PROTOCOL_ALIASES.get(name.lower(), name)


def paper_row(size: str) -> str | None:
    return PAPER_ROW.get(size)


def size_key(size: str) -> tuple[int, str]:
    """Sort key: the paper's sizes in its order, then any other."""
    order = list(PAPER_ROW)
    return (order.index(size), "") if size in order else (len(order), size)


def protocol_key(p: str) -> tuple[int, str]:
    """Sort key: the paper's protocols in its order, then any other."""
    return (PROTOCOLS.index(p), "") if p in PROTOCOLS else (len(PROTOCOLS), p)


def arch_key(arch: str) -> tuple[int, str]:
    """Sort key: CRATE, GPT, GPT-SAE, then any other."""
    return (ARCH_ORDER.index(arch), "") if arch in ARCH_ORDER else (len(ARCH_ORDER), arch)
