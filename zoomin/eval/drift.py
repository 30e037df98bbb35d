"""Precision drift: how far an engine's answers move from a reference engine's (say int4 against fp32) on the
same images, verdicts, scores, boxes and the generated text itself."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .data import Sample
from .metrics import common_prefix_fraction, greedy_match_iou

Tokenize = Callable[[str], list[int]]


def engine_tokenizer(engine_dir: str | Path) -> Tokenize:
    """Token ids of a text under the engine's own tokenizer (special tokens in the text kept as tokens)."""
    from tokenizers import Tokenizer

    from ..runtime.manifest import Manifest

    tok = Tokenizer.from_file(str(Path(engine_dir) / Manifest.load(engine_dir).graphs["tokenizer"]))
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def _boxes(record: Mapping[str, Any]) -> list[Sequence[float]]:
    return [r["box"] for r in record.get("boxes", [])]


def _stats(values: Sequence[float]) -> dict[str, float | int | None]:
    a = np.asarray(values, np.float64)
    return {"n": int(a.size), "mean": float(a.mean()) if a.size else None, "max": float(a.max()) if a.size else None,
            "min": float(a.min()) if a.size else None}


def drift(samples: Sequence[Sample], records: Mapping[str, Mapping[str, Any]],
          reference: Mapping[str, Mapping[str, Any]], tokenize: Tokenize | None = None) -> dict[str, Any]:
    """Compare predictions with the reference's on the samples both ran without error.

    verdict agreement counts two missing verdicts as agreeing; score differences are over images where both
    scored; box IoU is the greedy one-to-one match (metrics.greedy_match_iou) over images where either engine
    examined a box; text agreement is the exact-match rate of both answers and, with `tokenize`, the mean
    fraction of leading tokens they share (metrics.common_prefix_fraction).
    """
    pairs = [(records[s.key], reference[s.key]) for s in samples
             if s.key in records and s.key in reference and not records[s.key]["error"]
             and not reference[s.key]["error"]]
    out: dict[str, Any] = {"n_images": len(pairs)}
    if not pairs:
        return out
    for field in ("verdict", "stage1_verdict"):
        out[f"{field}_agreement"] = float(np.mean([a[field] == b[field] for a, b in pairs]))
    for field in ("score", "stage1_score"):
        diffs = [abs(a[field] - b[field]) for a, b in pairs if a[field] is not None and b[field] is not None]
        out[f"{field}_abs_diff"] = _stats(diffs)
        out[f"{field}_presence_mismatch"] = sum((a[field] is None) != (b[field] is None) for a, b in pairs)
    ious = [v for a, b in pairs if (v := greedy_match_iou(_boxes(a), _boxes(b))) is not None]
    out["box_iou"] = _stats(ious)
    out["box_count_agreement"] = float(np.mean([len(_boxes(a)) == len(_boxes(b)) for a, b in pairs]))
    for field in ("stage1_text", "final_text"):
        out[f"{field}_exact"] = float(np.mean([a[field] == b[field] for a, b in pairs]))
        if tokenize is not None:
            shared = [common_prefix_fraction(tokenize(a[field]), tokenize(b[field])) for a, b in pairs]
            out[f"{field}_prefix_tokens"] = float(np.mean(shared))
    return out
