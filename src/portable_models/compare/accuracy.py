"""The task metric: with labels for the real samples (``labels=``, one class index per row of
each sample case), every artifact's accuracy is measured on them next to the source model's,
and a drop larger than the budget (in points) fails the artifact, whatever its numbers say
elsewhere. This is how a quantised variant is judged the way its users judge it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ACCURACY_DROP_MAX", "TaskCheck", "accuracy"]

#: the default budget: the most accuracy an artifact may lose against the source, in points
ACCURACY_DROP_MAX = 1.0


def accuracy(outputs: Sequence[Mapping[str, np.ndarray]], labels: Sequence[np.ndarray], output: str) -> float:
    """Top-1 accuracy of ``output`` (class scores on the last axis) against ``labels``."""
    hits = total = 0
    for case, want in zip(outputs, labels, strict=True):
        if not np.size(want):  # a case without labels
            continue
        scores = np.asarray(case[output])
        got = np.argmax(scores.reshape(-1, scores.shape[-1]), axis=1)
        want = np.asarray(want).reshape(-1)
        hits += int(np.count_nonzero(got == want))
        total += int(want.size)
    return hits / total if total else 0.0


@dataclass(frozen=True, kw_only=True)
class TaskCheck:
    """Labels per golden case, the output holding class scores, the source's accuracy on
    them, and the budget."""

    labels: tuple[np.ndarray, ...]
    output: str
    source_accuracy: float
    drop_max: float = ACCURACY_DROP_MAX

    def judge(self, actual: Sequence[Mapping[str, np.ndarray]], cases: Sequence[int] | None) -> dict[str, Any]:
        """The record of an artifact's accuracy on the labelled cases it ran (all, or ``cases``)."""
        labels = self.labels if cases is None else tuple(self.labels[i] for i in cases)
        got = accuracy(actual, labels, self.output)
        drop = 100.0 * (self.source_accuracy - got)
        return {"output": self.output, "artifact": round(got, 6), "source": round(self.source_accuracy, 6),
                "drop_points": round(drop, 4), "drop_max_points": self.drop_max, "rows": int(sum(a.size for a in labels)),
                "status": "pass" if drop <= self.drop_max else "fail"}

    def to_contract(self) -> dict[str, Any]:
        return {"output": self.output, "source_accuracy": self.source_accuracy, "drop_max_points": self.drop_max}
