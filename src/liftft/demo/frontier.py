"""Learning against forgetting, compared fairly: each method's frontier of (target accuracy, source accuracy)
points over its learning rates and training steps, and its source accuracy at matched target levels.

Comparing methods at each one's best target accuracy compares them where every one has forgotten almost
everything. Along the frontiers the question is instead: having learned this much, how much did a method keep?
"""

from __future__ import annotations

# The target accuracies at which the methods' retention is compared; the levels some method never reaches are dropped.
LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def frontier(points: list[dict]) -> list[dict]:
    """The points no other point beats: none has both a target and a source accuracy at least as high, one higher.

    ``points`` are dicts with ``target_acc`` and ``source_acc`` (and anything else, kept). Returns the frontier
    by rising target accuracy, hence falling source accuracy; of equal points, the first given.
    """
    best_source = float("-inf")
    kept = []
    # From the highest target down (higher source first on ties): a point is on the frontier when it keeps more
    # of the source than every point that learned at least as much.
    for point in sorted(points, key=lambda p: (-p["target_acc"], -p["source_acc"])):
        if point["source_acc"] > best_source:
            kept.append(point)
            best_source = point["source_acc"]
    return kept[::-1]


def source_at_level(points: list[dict], level: float) -> float | None:
    """The best source accuracy among ``points`` with target accuracy >= ``level``; None when none reaches it."""
    reached = [p["source_acc"] for p in points if p["target_acc"] >= level]
    return max(reached) if reached else None


def matched_levels(points_by_method: dict[str, list[dict]], levels=LEVELS) -> dict:
    """Each method's source accuracy at each target level that every method reaches.

    Returns ``{"levels": [...], "dropped": [...], "source_acc": {method: {str(level): accuracy}}}``: ``dropped``
    are the levels of ``levels`` some method never reached, left out for every method so that the comparison
    stays at equal learning.
    """
    kept, dropped = [], []
    for level in levels:
        reached = all(source_at_level(points, level) is not None for points in points_by_method.values())
        (kept if reached and points_by_method else dropped).append(level)
    table = {method: {_key(level): source_at_level(points, level) for level in kept}
             for method, points in points_by_method.items()}
    return {"levels": kept, "dropped": dropped, "source_acc": table}


def _key(level: float) -> str:
    """A level as a JSON object key: ``0.3`` -> ``"0.3"``."""
    return f"{level:g}"
