"""Task groupings from an affinity matrix: the partitions of the tasks into K groups with the highest total affinity.

TAG (Fifty et al., NeurIPS 2021, section 3.2) scores a group by how much its members help each other: for each task
``j`` of a group, the mean affinity ``Z[i -> j]`` onto it from the group's other members ``i``; a task alone in its
group scores 0 (no partner helps or hurts it). The total of a grouping is the sum of these scores over all tasks.

TAG itself lets groups overlap (a task may be trained in several groups and is served by the one that suits it
best) and picks K groups out of all candidate subsets with a branch-and-bound search. Here every task belongs to
exactly one group (a partition: one model per group, each task trained once) and the search is exhaustive: every
partition of the T tasks into exactly K non-empty groups (a Stirling number of the second kind of them, at most
42,525 for T = 10) is scored, from precomputed scores of all ``2^T`` subsets. That is exact, and cheap up to
:data:`MAX_TASKS` tasks; beyond it the count explodes and :func:`best_partitions` refuses with an error.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from mtl_lightning.errors import ConfigError

MAX_TASKS = 10  # S(10, 5) = 42,525 partitions at most; S(12, 6) would be 1.3 million, S(15, 7) 4e8


@dataclass(frozen=True)
class Proposal:
    """One grouping: ``groups`` of task indices (each sorted, groups ordered by their first task), its total score,
    and each task's share of it (the mean affinity onto the task from its group's other members), in task order."""

    groups: tuple[tuple[int, ...], ...]
    score: float
    per_task: tuple[float, ...]

    def named(self, names: Sequence[str]) -> list[list[str]]:
        return [[names[i] for i in group] for group in self.groups]


def _matrix(affinity: Sequence[Sequence[float]]) -> list[list[float]]:
    rows = [[float(v) for v in row] for row in affinity]
    if any(len(row) != len(rows) for row in rows):
        raise ValueError(f"the affinity matrix must be square, got rows of lengths {[len(r) for r in rows]}")
    bad = [(i, j) for i, row in enumerate(rows) for j, v in enumerate(row) if i != j and not math.isfinite(v)]
    if bad:
        raise ValueError(f"affinity entries {bad} (row -> column) are not finite; measure them or set them to 0")
    return rows


def onto_task(affinity: Sequence[Sequence[float]], group: Sequence[int], task: int) -> float:
    """The mean affinity onto ``task`` from the other members of ``group`` (0 when it is alone)."""
    others = [i for i in group if i != task]
    return sum(float(affinity[i][task]) for i in others) / len(others) if others else 0.0


def group_score(affinity: Sequence[Sequence[float]], group: Sequence[int]) -> float:
    """Sum over the group's tasks of the mean affinity onto each from the group's other members."""
    return sum(onto_task(affinity, group, j) for j in group)


def set_partitions(num_items: int, num_groups: int) -> Iterator[tuple[tuple[int, ...], ...]]:
    """Every partition of ``range(num_items)`` into exactly ``num_groups`` non-empty groups, each once.

    Item ``i`` joins one of the groups opened so far or opens the next one (restricted growth strings), so groups
    come ordered by their first item; branches that could no longer open enough groups are cut.
    """
    if num_groups < 1 or num_groups > num_items:
        return
    groups: list[list[int]] = []

    def place(item: int) -> Iterator[tuple[tuple[int, ...], ...]]:
        if item == num_items:
            if len(groups) == num_groups:
                yield tuple(tuple(g) for g in groups)
            return
        left = num_items - item
        if len(groups) + left > num_groups:  # joining an open group still leaves enough items to open the rest
            for group in groups:
                group.append(item)
                yield from place(item + 1)
                group.pop()
        if len(groups) < num_groups:
            groups.append([item])
            yield from place(item + 1)
            groups.pop()

    yield from place(0)


def check_grouping_request(num_tasks: int, num_groups: int) -> None:
    """One clear error for a request that has no answer (too few tasks, a K out of range, too many tasks)."""
    if num_tasks < 2:
        raise ConfigError(
            f"task grouping needs at least 2 tasks; the config has {num_tasks}. Add tasks to the data section"
        )
    if num_groups < 1 or num_groups > num_tasks:
        raise ConfigError(
            f"the number of groups must be between 1 and the number of tasks ({num_tasks}), got {num_groups}"
        )
    if num_tasks > MAX_TASKS:
        raise ConfigError(
            f"exhaustive grouping search is limited to {MAX_TASKS} tasks (the partitions grow faster than "
            f"exponentially), got {num_tasks}; group a subset of the tasks, or merge tasks you know belong together"
        )


def best_partitions(affinity: Sequence[Sequence[float]], num_groups: int, top: int = 5) -> list[Proposal]:
    """The ``top`` partitions of the tasks into ``num_groups`` groups with the highest total affinity, best first.

    ``affinity[i][j]``: the affinity of task i onto task j (the diagonal is not read). Ties are broken by the groups
    themselves (lexicographically), so the order is deterministic.
    """
    rows = _matrix(affinity)
    t = len(rows)
    check_grouping_request(t, num_groups)
    if top < 1:
        raise ConfigError(f"the number of proposals must be >= 1, got {top}")
    # The score of every subset once (bitmask -> score): a partition's total is then K lookups.
    score_of = [group_score(rows, [i for i in range(t) if mask >> i & 1]) for mask in range(1 << t)]
    best: list[tuple[float, tuple[tuple[int, ...], ...]]] = []
    for partition in set_partitions(t, num_groups):
        total = sum(score_of[sum(1 << i for i in group)] for group in partition)
        entry = (round(total, 12), _negated(partition))  # heap of the top: the smallest total is popped first
        if len(best) < top:
            heapq.heappush(best, entry)
        elif entry > best[0]:
            heapq.heapreplace(best, entry)
    proposals = []
    for _, negated in sorted(best, reverse=True):
        partition = _negated(negated)
        per_task = [0.0] * t
        for group in partition:
            for j in group:
                per_task[j] = onto_task(rows, group, j)
        proposals.append(Proposal(partition, sum(per_task), tuple(per_task)))
    return proposals


def _negated(partition: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
    """Indices negated, so that among equal totals the lexicographically smallest partition ranks first."""
    return tuple(tuple(-i for i in group) for group in partition)
