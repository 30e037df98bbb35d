"""The evaluation report: per-engine metrics from the predictions, metrics.json, report.md and the plots.

What each figure means is DEFINITIONS, written into report.md so that a report explains itself.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics as m
from .data import POSITIVE, Sample

Records = Mapping[str, Mapping[str, Any]]

DEFINITIONS = (
    "accuracy: verdict == label over every image that ran; no verdict counts as wrong (its rate is given apart).",
    "precision / recall / F1 are for \"generated\"; a generated image without a verdict is a miss.",
    "AUROC (ties count 1/2), average precision (step-wise, no interpolation) and ECE use `score`, P(generated) at "
    "the final verdict word, on the images that have one (a score exists only with a verdict).",
    "ECE: 10 equal-width bins of P(generated) on [0, 1] (the last includes 1); the sum over bins of "
    "(n_bin / n) * |fraction generated - mean P(generated)|. The reliability diagram plots the same bins.",
    "verdict changes: query 1's verdict (stage1_verdict) against the final one; fixed = wrong or none after "
    "query 1 and right after query 2, broke = the reverse.",
    "box IoU: for each ground-truth box, the best IoU with any examined box (0 if none); the mean over all of them.",
    "drift: verdict agreement counts two missing verdicts as agreeing; score differences are over images both "
    "engines scored; box IoU is a greedy one-to-one match (unpaired boxes count 0) over images where either "
    "examined a box; text agreement is the exact-match rate of both answers and the mean fraction of leading "
    "tokens they share (re-tokenized with the reference engine's tokenizer).",
)


def engine_metrics(samples: Sequence[Sample], records: Records) -> dict[str, Any]:
    """Every figure of one engine over the samples it has records for (errors counted, not scored)."""
    ran = [(s, records[s.key]) for s in samples if s.key in records]
    ok = [(s, r) for s, r in ran if not r["error"]]
    labels = [s.label for s, _ in ok]
    verdicts = [r["verdict"] for _, r in ok]
    out: dict[str, Any] = {"n_images": len(ran), "n_evaluated": len(ok), "n_errors": len(ran) - len(ok),
                           "n_by_label": dict(Counter(labels)), "accuracy": m.accuracy(labels, verdicts),
                           **m.precision_recall_f1(labels, verdicts, POSITIVE)}
    n_none = sum(v is None for v in verdicts)
    out.update(n_no_verdict=n_none, no_verdict_rate=n_none / len(ok) if ok else None,
               confusion=m.confusion(labels, verdicts))
    scored = [(s.label == POSITIVE, r["score"]) for s, r in ok if r["score"] is not None]
    y = np.array([t for t, _ in scored], bool)
    p = np.array([v for _, v in scored], np.float64)
    out.update(n_scored=len(scored), auroc=m.auroc(y, p), average_precision=m.average_precision(y, p),
               ece=m.ece(y, p), reliability=m.reliability_bins(y, p))
    out["stage1"] = {"accuracy": m.accuracy(labels, [r["stage1_verdict"] for _, r in ok]),
                     "no_verdict_rate": (sum(r["stage1_verdict"] is None for _, r in ok) / len(ok)) if ok else None}
    out["verdict_changes"] = verdict_changes(labels, [r["stage1_verdict"] for _, r in ok], verdicts)
    counts = [len(r["boxes"]) for _, r in ok]
    out["boxes"] = {"distribution": {str(k): v for k, v in sorted(Counter(counts).items())},
                    "mean": float(np.mean(counts)) if counts else None}
    annotated = [(s, r) for s, r in ok if s.boxes]
    best = [v for s, r in annotated for v in m.best_match_iou(s.boxes, [b["box"] for b in r["boxes"]])]
    out["box_iou"] = {"n_images": len(annotated), "n_boxes": len(best),
                      "mean_best_iou": float(np.mean(best)) if best else None}
    totals = [r["timings_ms"]["total"] for _, r in ok]
    out["mean_total_ms"] = float(np.mean(totals)) if totals else None
    return out


def verdict_changes(labels: Sequence[str], first: Sequence[str | None], final: Sequence[str | None]
                    ) -> dict[str, int]:
    """How query 2 moved the verdict: every "a->b" transition with a != b ("none" for no verdict), and how many
    of those fixed or broke the answer."""
    out: dict[str, int] = {"changed": 0, "fixed": 0, "broke": 0}
    for t, a, b in zip(labels, first, final, strict=True):
        if a == b:
            continue
        out["changed"] += 1
        name = f"{a or 'none'}->{b or 'none'}"
        out[name] = out.get(name, 0) + 1
        out["fixed"] += a != t and b == t
        out["broke"] += a == t and b != t
    return out


def build_report(samples: Sequence[Sample], runs: Mapping[str, Records], *, reference: str | None = None,
                 drift: Mapping[str, Mapping[str, Any]] | None = None, settings: Mapping[str, Any] | None = None
                 ) -> dict[str, Any]:
    """metrics.json's content: settings, per-engine metrics, drift against the reference, errors."""
    errors = [{"engine": name, "key": s.key, "path": records[s.key]["path"], "error": records[s.key]["error"]}
              for name, records in runs.items() for s in samples if s.key in records and records[s.key]["error"]]
    return {"settings": dict(settings or {}), "n_samples": len(samples),
            "engines": {name: engine_metrics(samples, records) for name, records in runs.items()},
            "reference": reference, "drift": dict(drift or {}), "errors": errors}


def write_report(out_dir: Path, report: Mapping[str, Any], samples: Sequence[Sample], runs: Mapping[str, Records]
                 ) -> list[Path]:
    """metrics.json, report.md and the plots (when matplotlib is installed) into out_dir; the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    try:
        plots, note = write_plots(out_dir, samples, runs), None
    except ImportError as e:
        plots, note = [], f"No plots: {e} (pip install 'zoomin[eval]')."
    (out_dir / "report.md").write_text(render_markdown(report, plots, note))
    return [out_dir / "metrics.json", out_dir / "report.md", *plots]


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows)]


def render_markdown(report: Mapping[str, Any], plots: Sequence[Path] = (), plot_note: str | None = None) -> str:
    engines = report["engines"]
    lines = ["# ZoomIn evaluation", "", f"{report['n_samples']} images; settings: `{json.dumps(report['settings'])}`",
             "", "## Detection", ""]
    keys = ["n_evaluated", "n_errors", "accuracy", "precision", "recall", "f1", "no_verdict_rate", "n_scored",
            "auroc", "average_precision", "ece"]
    lines += _table(["engine", *keys], [[name, *(e[k] for k in keys)] for name, e in engines.items()])
    lines += ["", "## Confusion (rows: label; columns: verdict)", ""]
    for name, e in engines.items():
        lines += [f"**{name}**", "", *_table(["label", "real", "generated", "none"],
                                           [[t, *row.values()] for t, row in e["confusion"].items()]), ""]
    lines += ["## Query 1 -> query 2", ""]
    lines += _table(["engine", "stage-1 accuracy", "changed", "fixed", "broke", "transitions"],
                    [[name, e["stage1"]["accuracy"], e["verdict_changes"]["changed"], e["verdict_changes"]["fixed"],
                      e["verdict_changes"]["broke"],
                      ", ".join(f"{k} {v}" for k, v in e["verdict_changes"].items() if "->" in k) or "–"]
                     for name, e in engines.items()])
    lines += ["", "## Boxes", ""]
    lines += _table(["engine", "boxes per image (count: images)", "mean", "images with ground truth",
                     "mean best-match IoU"],
                    [[name, ", ".join(f"{k}: {v}" for k, v in e["boxes"]["distribution"].items()) or "–",
                      e["boxes"]["mean"], e["box_iou"]["n_images"], e["box_iou"]["mean_best_iou"]]
                     for name, e in engines.items()])
    if report["drift"]:
        lines += ["", f"## Drift against {report['reference']}", ""]
        cols = ["n_images", "verdict_agreement", "stage1_verdict_agreement", "score mean abs diff",
                "score max abs diff", "box IoU mean", "stage1_text_exact", "final_text_exact",
                "stage1_text_prefix_tokens", "final_text_prefix_tokens"]
        lines += _table(["engine", *cols],
                        [[name, d.get("n_images"), d.get("verdict_agreement"), d.get("stage1_verdict_agreement"),
                          d.get("score_abs_diff", {}).get("mean"), d.get("score_abs_diff", {}).get("max"),
                          d.get("box_iou", {}).get("mean"), d.get("stage1_text_exact"), d.get("final_text_exact"),
                          d.get("stage1_text_prefix_tokens"), d.get("final_text_prefix_tokens")]
                         for name, d in report["drift"].items()])
    if report["errors"]:
        lines += ["", f"## Errors ({len(report['errors'])}, skipped)", ""]
        lines += [f"- {e['engine']}: {e['error']}" for e in report["errors"]]
    if plots or plot_note:
        lines += ["", "## Plots", "", *(f"![{p.stem}]({p.name})" for p in plots), *([plot_note] if plot_note else [])]
    lines += ["", "## Definitions", "", *(f"- {d}" for d in DEFINITIONS)]
    return "\n".join(lines) + "\n"


def write_plots(out_dir: Path, samples: Sequence[Sample], runs: Mapping[str, Records]) -> list[Path]:
    """roc.png, reliability.png and scores.png (score histograms by label), every engine in each. Raises
    ImportError without matplotlib. Uses the Agg canvas directly: no pyplot, no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scored = {}
    for name, records in runs.items():
        pairs = [(s.label == POSITIVE, records[s.key]["score"]) for s in samples
                 if s.key in records and not records[s.key]["error"] and records[s.key]["score"] is not None]
        scored[name] = (np.array([t for t, _ in pairs], bool), np.array([v for _, v in pairs], np.float64))

    def save(fig: Figure, name: str) -> Path:
        FigureCanvasAgg(fig)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=100)
        return path

    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls=":", c="gray")
    for name, (y, p) in scored.items():
        curve = m.roc_curve(y, p)
        if curve is not None:
            ax.plot(*curve, label=f"{name} (AUROC {m.auroc(y, p):.3f})")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (generated = positive)",
           xlim=(0, 1), ylim=(0, 1.02))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    paths = [save(fig, "roc.png")]

    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls=":", c="gray")
    for name, (y, p) in scored.items():
        bins = [b for b in m.reliability_bins(y, p) if b["count"]]
        if bins:
            ece = m.ece(y, p)
            ax.plot([b["mean_score"] for b in bins], [b["frac_generated"] for b in bins], "o-",
                    label=f"{name} (ECE {ece:.3f})")
    ax.set(xlabel="mean P(generated) in bin", ylabel="fraction generated", title="Reliability (10 bins)",
           xlim=(0, 1), ylim=(0, 1.02))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left")
    paths.append(save(fig, "reliability.png"))

    fig = Figure(figsize=(5, 2.2 * len(scored)))
    for i, (name, (y, p)) in enumerate(scored.items()):
        ax = fig.add_subplot(len(scored), 1, i + 1)
        for label, mask in (("real", ~y), ("generated", y)):
            ax.hist(p[mask], bins=np.linspace(0, 1, 21), alpha=0.6, label=f"{label} ({int(mask.sum())})")
        ax.set(title=name, xlabel="P(generated)", ylabel="images", xlim=(0, 1))
        ax.legend(loc="upper center")
    paths.append(save(fig, "scores.png"))
    return paths
