"""Input checks shared by the metrics: clear errors instead of silently odd scores."""

from __future__ import annotations

from collections.abc import Sequence


def check_str(value: object, what: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}: {value!r}")


def check_ground_truths(ground_truths: Sequence[str]) -> Sequence[str]:
    if isinstance(ground_truths, str):
        raise TypeError(
            f"ground_truths must be a sequence of str, got a single str {ground_truths!r}; "
            "wrap it in a list"
        )
    if len(ground_truths) == 0:
        raise ValueError("ground_truths is empty: a question needs at least one ground truth")
    for gt in ground_truths:
        check_str(gt, "ground truth")
    return ground_truths
