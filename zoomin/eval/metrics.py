"""Detection metrics in plain numpy (no scikit-learn at run time).

Conventions: "generated" is the positive class; `y` is a boolean array (True = generated) and `scores` are
P(generated). A metric that is undefined on its input (one class only, no scored samples, empty denominators)
returns None, which the report writes as null, instead of raising or returning NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Box = Sequence[float]  # x1, y1, x2, y2


def _ratio(num: float, den: float) -> float | None:
    return float(num) / den if den else None


def accuracy(labels: Sequence[str], verdicts: Sequence[str | None]) -> float | None:
    """Fraction of samples whose verdict equals the label; no verdict (None) counts as wrong."""
    return _ratio(sum(v == t for t, v in zip(labels, verdicts, strict=True)), len(labels))


def confusion(labels: Sequence[str], verdicts: Sequence[str | None], classes: Sequence[str] = ("real", "generated")
              ) -> dict[str, dict[str, int]]:
    """Counts by true label (outer key), then verdict (inner key; "none" for no verdict)."""
    out = {t: {v: 0 for v in (*classes, "none")} for t in classes}
    for t, v in zip(labels, verdicts, strict=True):
        out[t][v if v is not None else "none"] += 1
    return out


def precision_recall_f1(labels: Sequence[str], verdicts: Sequence[str | None], positive: str = "generated"
                        ) -> dict[str, float | None]:
    """For the positive class. A positive sample without a verdict is a miss (lowers recall, not precision)."""
    tp = sum(t == positive and v == positive for t, v in zip(labels, verdicts, strict=True))
    predicted = sum(v == positive for v in verdicts)
    actual = sum(t == positive for t in labels)
    p, r = _ratio(tp, predicted), _ratio(tp, actual)
    f1 = None if p is None or r is None else (2 * p * r / (p + r) if p + r else 0.0)
    return {"precision": p, "recall": r, "f1": f1}


def _two_classes(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    y, s = np.asarray(y, bool), np.asarray(scores, np.float64)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
    return (y, s) if 0 < y.sum() < y.size else None


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    _, first, counts = np.unique(sorted_x, return_index=True, return_counts=True)
    mean_rank = first + (counts + 1) / 2.0  # mean of first+1 .. first+count
    ranks = np.empty(x.size)
    ranks[order] = np.repeat(mean_rank, counts)
    return ranks


def auroc(y: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve: P(score of a random positive > that of a random negative), ties counting 1/2
    (the Mann-Whitney U statistic over n_pos * n_neg). None unless both classes are present."""
    both = _two_classes(y, scores)
    if both is None:
        return None
    y, s = both
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    u = _midranks(s)[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def _operating_points(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative true and false positives when predicting positive for score >= each distinct threshold,
    thresholds descending (tied scores enter together)."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(y)[last_of_tie]
    return tp, (last_of_tie + 1) - tp


def roc_curve(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(false positive rate, true positive rate) from (0, 0) to (1, 1); None unless both classes are present."""
    both = _two_classes(y, scores)
    if both is None:
        return None
    y, s = both
    tp, fp = _operating_points(y, s)
    return np.r_[0.0, fp / (~y).sum()], np.r_[0.0, tp / y.sum()]


def average_precision(y: np.ndarray, scores: np.ndarray) -> float | None:
    """Sum over distinct thresholds of (recall step) x precision there: the area under the step-wise
    precision-recall curve, without interpolation. None when there is no positive sample."""
    y, s = np.asarray(y, bool), np.asarray(scores, np.float64)
    if not y.any():
        return None
    tp, fp = _operating_points(y, s)
    recall = tp / y.sum()
    precision = tp / (tp + fp)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def reliability_bins(y: np.ndarray, scores: np.ndarray, n_bins: int = 10) -> list[dict[str, float | int | None]]:
    """Equal-width bins of P(generated) over [0, 1]: bin i holds i/n <= p < (i+1)/n (the last bin includes 1).
    Per bin: count, mean score and the fraction that is actually generated (None for an empty bin)."""
    y, s = np.asarray(y, bool), np.asarray(scores, np.float64)
    idx = np.clip(np.floor(s * n_bins).astype(int), 0, n_bins - 1)
    out = []
    for i in range(n_bins):
        m = idx == i
        n = int(m.sum())
        out.append({"lo": i / n_bins, "hi": (i + 1) / n_bins, "count": n,
                    "mean_score": float(s[m].mean()) if n else None,
                    "frac_generated": float(y[m].mean()) if n else None})
    return out


def ece(y: np.ndarray, scores: np.ndarray, n_bins: int = 10) -> float | None:
    """Expected calibration error of P(generated): sum over equal-width bins b of (n_b / N) *
    |fraction generated in b - mean score in b|. None without scored samples."""
    bins = reliability_bins(y, scores, n_bins)
    total = sum(b["count"] for b in bins)
    if not total:
        return None
    return float(sum(b["count"] / total * abs(b["frac_generated"] - b["mean_score"]) for b in bins if b["count"]))


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (x1, y1, x2, y2); 0 when both are empty."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def best_match_iou(truth: Sequence[Box], predicted: Sequence[Box]) -> list[float]:
    """For each ground-truth box, its highest IoU with any predicted box (0 when nothing was predicted)."""
    return [max((iou(t, p) for p in predicted), default=0.0) for t in truth]


def greedy_match_iou(a: Sequence[Box], b: Sequence[Box]) -> float | None:
    """Mean IoU of a one-to-one matching of two box sets, pairing the highest-IoU boxes first; a box left
    unpaired (the sets differ in size, or it overlaps nothing left) counts 0. None when both sets are empty."""
    if not a and not b:
        return None
    pairs = sorted(((iou(x, y), i, j) for i, x in enumerate(a) for j, y in enumerate(b)), reverse=True)
    used_a, used_b, total = set(), set(), 0.0
    for v, i, j in pairs:
        if v > 0 and i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            total += v
    return total / max(len(a), len(b))


def common_prefix_fraction(a: Sequence[int], b: Sequence[int]) -> float:
    """Leading tokens two sequences share, over the longer one's length (1 when both are empty)."""
    n = max(len(a), len(b))
    if not n:
        return 1.0
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same / n
