"""How the in-process backend cuts work into forward passes: runs of rows sorted by length that compute the fewest
padded tokens, and groups of prompts that share a token prefix (run once, its KV cache reused)."""

from __future__ import annotations

import math
from collections.abc import Sequence

# A forward pass costs, besides its tokens, about as much as this many tokens more (the 30 layers' fixed work, and
# the lower matmul efficiency of a small batch: SmolLM2 on 2 CPU cores runs 1 x 250 tokens at 350 tokens/s and
# 16 x 256 at 520), so a batch is split only where that saves more padding than this.
PASS_COST = 128


def token_batches(lengths: Sequence[int], max_tokens: int, pass_cost: int = PASS_COST) -> list[list[int]]:
    """Split rows sorted by length into consecutive batches that minimise the padded tokens computed, each batch
    costing rows x its longest row plus `pass_cost`, within `max_tokens` padded tokens per batch (a longer row
    alone). Dynamic programming over the split points: sorted, the best batches are runs."""
    if any(a > b for a, b in zip(lengths, lengths[1:])):
        raise ValueError("token_batches needs rows sorted by length")
    n = len(lengths)
    best = [0] + [math.inf] * n  # best[j]: the cheapest split of rows[:j]
    start = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[j - 1]
        for i in range(j - 1, -1, -1):
            rows = j - i
            if rows > 1 and rows * longest > max_tokens:
                break
            cost = best[i] + rows * longest + pass_cost
            if cost < best[j]:
                best[j], start[j] = cost, i
    runs, j = [], n
    while j > 0:
        runs.append(list(range(start[j], j)))
        j = start[j]
    return runs[::-1]


def prefix_groups(seqs: Sequence[Sequence[int]], caps: Sequence[int]) -> list[tuple[int, list[int]]]:
    """Partition token sequences into (prefix length, members) groups whose members all start with that prefix, so
    that running each group's prefix once, then every member's rest, computes few tokens. A member's prefix stops
    at `caps[i]` (its first slot: the logits read there must come from its rest). Sorted, sequences that share a
    prefix are neighbours: a run of them shares its weakest link r; each part of the run between links of r
    either joins the run's group at prefix r or, when that computes fewer tokens, is grouped on its own the same
    way. Sequences in no group come back together, with prefix 0."""
    if not seqs:
        return []
    order = sorted(range(len(seqs)), key=lambda i: list(seqs[i]))
    links = []
    for a, b in zip(order, order[1:]):
        n, k = min(caps[a], caps[b], len(seqs[a]) - 1, len(seqs[b]) - 1), 0
        while k < n and seqs[a][k] == seqs[b][k]:
            k += 1
        links.append(k)

    def plan(lo: int, hi: int) -> tuple[int, list[tuple[int, list[int]]]]:  # (tokens, groups) of order[lo:hi + 1]
        if lo == hi:
            return len(seqs[order[lo]]), [(0, [order[lo]])]
        r = min(links[lo:hi])
        cost, groups, joined, start = 0, [], [], lo
        for j in range(lo, hi + 1):
            if j == hi or links[j] == r:
                part = order[start : j + 1]
                alone = plan(start, j)
                if r > 0 and sum(len(seqs[i]) - r for i in part) < alone[0]:
                    joined += part
                    cost += sum(len(seqs[i]) - r for i in part)
                else:
                    cost, groups = cost + alone[0], groups + alone[1]
                start = j + 1
        return (cost + r, [(r, joined)] + groups) if joined else (cost, groups)

    groups = plan(0, len(order) - 1)[1]
    shared = [(p, g) for p, g in groups if p > 0 and len(g) > 1]  # a prefix of one member saves nothing
    loose = sorted(i for p, g in groups if not (p > 0 and len(g) > 1) for i in g)
    return shared + ([(0, loose)] if loose else [])


__all__ = ["PASS_COST", "token_batches", "prefix_groups"]
