"""A perf run's results as JSON (every number), a markdown summary and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .bench import STAGES

ROW_LABELS = {"decode": "image decode", "preprocess": "preprocess", "vision_full": "vision encode (full image)",
              "stage1_prefill": "stage-1 prefill", "stage1_decode": "stage-1 decode", "crop": "crop/zoom",
              "vision_crops": "vision encode (crops)", "stage2_prefill": "stage-2 prefill",
              "stage2_decode": "stage-2 decode", "other": "other (parsing, text, glue)",
              "ttft": "time to first token", "stage2": "stage 2 (vision + prefill + decode)",
              "total": "**end to end**", "decode_ms_per_token": "decode ms/token"}
SUMMARY_ROWS = (*STAGES, "other", "ttft", "total", "decode_ms_per_token")
PIXELS_PER_TOKEN = 28 * 28  # Qwen2.5-VL: 14 px patches merged 2 x 2
NOISY_CORES = 0.25  # median background load above which a configuration's numbers are flagged


def write_all(results: dict, folder: Path) -> dict[str, Path]:
    """perf.json, perf.md and the plots into `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "perf.json", "markdown": folder / "perf.md"}
    paths["json"].write_text(json.dumps(results, indent=2, default=_jsonable) + "\n")
    try:
        paths |= plot(results, folder)
    except ImportError:  # matplotlib (the eval or dev extra) draws the plots; the tables need nothing of it
        pass
    paths["markdown"].write_text(markdown(results, {k: v.name for k, v in paths.items() if v.suffix == ".png"}))
    return paths


def _jsonable(o):
    return str(o)


def _labels(results: dict) -> list[str]:
    """Baseline first, then engines in the order they were measured."""
    base = results["baseline"]
    return [base] * (base in results["configs"]) + [k for k in results["configs"] if k != base]


def _ms(v: float) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2f}"


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}"


def _name(path: str) -> str:
    return Path(path).stem


def _image_line(results: dict, path: str) -> str:
    any_cfg = next(iter(results["configs"].values()))
    img = any_cfg["images"][path]
    (w, h), (mw, mh) = img["image_size"], img["model_size"]
    return f"{_name(path)} ({w}x{h}, seen as {mw}x{mh} = {mw * mh // PIXELS_PER_TOKEN} image tokens)"


def markdown(results: dict, plots: dict[str, str]) -> str:
    m, s = results["machine"], results["settings"]
    ver = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    bw = results["bandwidth"]
    shape = s["checkpoint_config"]
    wl = s["workload"]
    lines = [
        f"# zoomin perf{' (preset ' + results['preset'] + ')' if results['preset'] else ''}",
        "",
        f"- Machine: {m['cpu']}, {m['cores_usable']} usable cores ({m['cores_physical'] or '?'} physical), "
        f"{m['memory_bytes'] / 2**30:.1f} GiB RAM ({(m['memory_available_at_start'] or 0) / 2**30:.1f} GiB available "
        f"at start), {m['os']}; SIMD: {' '.join(m['simd'])}",
        f"- Memory bandwidth (numpy, best of copy/read over 1..{s['threads']} threads): "
        f"{bw['bytes_per_s'] / 1e9:.1f} GB/s (copy {bw['copy_bytes_per_s'] / 1e9:.1f}, read "
        f"{bw['read_bytes_per_s'] / 1e9:.1f}; the better of the run's start {bw['start_bytes_per_s'] / 1e9:.1f} and "
        f"end {bw['end_bytes_per_s'] / 1e9:.1f})",
        f"- Load average at start / end: {m['load_average_at_start']} / {m['load_average_at_end']}",
        f"- Versions: {ver}",
        f"- Command: `{results['command']}`",
        f"- Model: {s['checkpoint']} (hidden {shape['hidden']}, {shape['text_layers']} text layers, vocab "
        f"{shape['vocab']}, vision hidden {shape['vision_hidden']} x {shape['vision_depth']} blocks)",
        f"- Job: query 1 answers {wl['stage1_tokens']} tokens with {wl['boxes']} boxes, query 2 answers "
        f"{wl['stage2_tokens']} tokens on {wl['boxes']} crops + the original; {s['warmup']} warm-up, then "
        f"{s['repeats']} timed repeats per image"
        f"{', interleaved across configurations' if s['interleaved'] else ''}; {s['threads']} threads for both "
        "backends",
        f"- Same work check ({', '.join(results['token_check']['keys'])}): {_token_check(results['token_check'])}",
        f"- Wall time of the run: {results['wall_s'] / 60:.1f} min, of which {s['quiet_waited_s'] / 60:.1f} min "
        "waiting for other processes to leave the cores alone",
        "",
    ]
    if results["failed"]:
        lines += ["Not measured:", ""] + [f"- {k}: {v}" for k, v in results["failed"].items()] + [""]
    if results["configs"]:
        lines += _profile_sections(results, plots)
    if "peers" in results:
        lines += peers_markdown(results["peers"])
    return "\n".join(lines) + "\n"


def _profile_sections(results: dict, plots: dict[str, str]) -> list[str]:
    """Per stage, by image size, KV reuse, bandwidth floor and targets: zoomin against transformers."""
    s, labels, base = results["settings"], _labels(results), results["baseline"]
    ref = s["reference_image"]
    lines: list[str] = []

    lines += [f"## Per stage, {_image_line(results, ref)}", "",
              "Median ms over the repeats (IQR in parentheses); ratio = zoomin / transformers (< 1 is faster).", ""]
    head = ["metric"]
    for label in labels:
        head += [label] if label == base else [label, "ratio"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ratios = results["ratios"]
    for key in SUMMARY_ROWS:
        row = [ROW_LABELS[key]]
        for label in labels:
            st = results["configs"][label]["images"][ref]["metrics"][key]
            row.append(f"{_ms(st['median'])} ({_ms(st['iqr'])})")
            if label != base:
                row.append(_x(ratios.get(label, {}).get(ref, {}).get(key)))
        lines.append("| " + " | ".join(row) + " |")
    extra = {
        "decode tokens/s": lambda c: f"{c['images'][ref]['metrics']['decode_tok_s']['median']:.1f}",
        "peak RSS (GiB)": lambda c: f"{c['peak_rss_bytes'] / 2**30:.2f}",
        "engine on disk (MiB)": lambda c: f"{c['info']['engine_bytes'] / 2**20:,.0f}" if "engine_bytes" in c["info"]
        else "-",
        "load time (s)": lambda c: f"{c['load_s']:.1f}",
        "background load (cores busy elsewhere)": lambda c: "-" if c["background_cores"] is None
        else f"{c['background_cores']['median']:.2f} (max {c['background_cores']['max']:.2f})",
    }
    for name, fn in extra.items():
        row = [name]
        for label in labels:
            row += [fn(results["configs"][label])] + ([] if label == base else [""])
        lines.append("| " + " | ".join(row) + " |")
    noisy = [f"{label} ({c['background_cores']['median']:.2f} cores)" for label, c in
             ((label, results["configs"][label]) for label in labels)
             if c["background_cores"] and c["background_cores"]["median"] > NOISY_CORES]
    if noisy:
        lines += ["", f"**Warning:** other processes kept the cores busy during {', '.join(noisy)}: those times are "
                      "inflated; rerun on a quiet machine before comparing."]
    if "stages" in plots:
        lines += ["", f"![stage breakdown]({plots['stages']})"]

    lines += ["", "## End-to-end latency by image size", "", "Median ms (ratio zoomin / transformers).", ""]
    head = ["image", "image tokens", *labels]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for path in results["images"]:
        any_img = results["configs"][labels[0]]["images"][path] if labels else None
        if any_img is None:
            break
        mw, mh = any_img["model_size"]
        row = [f"{_name(path)} {any_img['image_size'][0]}x{any_img['image_size'][1]}", str(mw * mh // PIXELS_PER_TOKEN)]
        for label in labels:
            v = results["configs"][label]["images"][path]["metrics"]["total"]["median"]
            r = ratios.get(label, {}).get(path, {}).get("total")
            row.append(_ms(v) + ("" if r is None else f" ({_x(r)})"))
        lines.append("| " + " | ".join(row) + " |")
    if "latency" in plots:
        lines += ["", f"![latency vs image size]({plots['latency']})"]

    if results["ablation"]:
        lines += ["", f"## KV reuse ablation (stage 2, {_name(ref)})", "",
                  "Same engine; reuse off recomputes query 1's prompt and answer in query 2's prefill.", "",
                  "| engine | stage-2 prefill tokens (reuse / off) | stage-2 prefill ms (reuse / off) | ratio | "
                  "stage 2 total ms (reuse / off) | ratio | end to end ms (reuse / off) |",
                  "|---|---|---|---|---|---|---|"]
        for label, a in results["ablation"].items():
            t = a["stage2_prefill_tokens"]
            lines.append(f"| {label} | {t['reuse']} / {t['no_reuse']} | {_ms(a['stage2_prefill']['reuse'])} / "
                         f"{_ms(a['stage2_prefill']['no_reuse'])} | {_x(a['stage2_prefill']['ratio'])} | "
                         f"{_ms(a['stage2']['reuse'])} / {_ms(a['stage2']['no_reuse'])} | {_x(a['stage2']['ratio'])} | "
                         f"{_ms(a['total']['reuse'])} / {_ms(a['total']['no_reuse'])} |")

    lines += ["", f"## Decode against the bandwidth floor ({_name(ref)})", "",
              "Bytes per decoded token = decoder weights incl. lm_head (+ one embedding row) + KV cache read at the "
              "mean decode context.", "",
              "| config | weights MB/token | KV MB/token | floor ms/token | achieved ms/token | fraction of floor |",
              "|---|---|---|---|---|---|"]
    for label in labels:
        f = results["floor"][label]
        lines.append(f"| {label} | {f['weight_bytes'] / 1e6:,.0f} | {f['kv_bytes'] / 1e6:.1f} | "
                     f"{f['floor_ms_per_token']:.1f} | {f['achieved_ms_per_token']:.1f} | "
                     f"{f['fraction_of_floor']:.0%} |")

    t = results["targets"]
    lines += ["", "## Targets (reported, not asserted)", "", "| target | goal | measured | met |", "|---|---|---|---|"]
    sp = t["int4_speedup_vs_baseline"]
    value = "not measured" if sp["value"] is None else f"{sp['value']:.2f}x"
    lines.append(f"| int4 end to end vs transformers fp32 ({_name(ref)}) | {sp['target']} | {value} | "
                 f"{_met(sp['met'])} |")
    for label, v in t["stage2_reuse_ratio"]["value"].items():
        pre = t["stage2_reuse_ratio"]["stage2_prefill_only"][label]
        lines.append(f"| stage 2 with / without reuse, {label} | {t['stage2_reuse_ratio']['target']} | {_x(v)} "
                     f"(prefill alone {_x(pre)}) | {_met(t['stage2_reuse_ratio']['met'][label])} |")
    for label, v in t["decode_floor_fraction"]["value"].items():
        lines.append(f"| decode vs bandwidth floor, {label} | {t['decode_floor_fraction']['target']} | {v:.0%} | "
                     f"{_met(t['decode_floor_fraction']['met'][label])} |")
    return lines


def _peer_value(c: dict, key: str) -> str:
    if key == "peak_rss_bytes":
        return f"{c[key] / 2**30:.2f}"
    if key == "size_bytes":
        return f"{c[key] / 2**20:,.0f}"
    v = c["metrics"][key]["median"]
    if not math.isfinite(v):
        return "-"
    return f"{v:,.2f}" if key == "job_s" else _ms(v) if key == "image_encode_ms" else f"{v:,.1f}"


def _job_tokens(tokens: dict | None) -> list[str]:
    """The job's token counts as each runtime reported them (they show the runtimes got the same prompts)."""
    if not tokens:
        return []
    return ["job tokens: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in tokens.items())]


def peers_markdown(peers: dict) -> list[str]:
    """The side-by-side table (medians), the ratios zoomin / peer, and what was not measured and why."""
    from .peers import METRICS, PEER_PRECISIONS, SIZE_METRICS

    s = peers["settings"]
    wl = s["workload"]
    lines = ["", "## Side by side with other runtimes", "",
             f"Same checkpoint, each runtime's own converter, {s['threads']} threads each, each in its own process, "
             f"interleaved round-robin per precision ({s['warmup']} warm-up, median of {s['repeats']} repeats). "
             f"Text prefill: a {s['text']['prefill_tokens']}-token text prompt, tok/s to the first token; decode: "
             f"{s['text']['decode_tokens']} tokens after it. ZoomIn job: both queries on {_name(s['image'])}, "
             f"{wl['stage1_tokens']} + {wl['stage2_tokens']} answer tokens, query 2 on the original + {wl['boxes']} "
             "crops; image encode = the full image's vision encode inside the job. '-': the runtime cannot do it.",
             "", "| precision | runtime | image encode ms | text prefill tok/s | decode tok/s | ZoomIn job s | "
             "peak RSS GiB | on disk MiB |", "|---|---|---|---|---|---|---|---|"]
    columns = (*METRICS, *SIZE_METRICS)
    configs = peers["configs"]
    order = sorted(configs, key=lambda k: (PEER_PRECISIONS.index(configs[k]["precision"]),
                                           configs[k]["peer"] == "zoomin", k))
    for label in order:
        c = configs[label]
        lines.append(f"| {c['precision']} | {c['runtime']} | " + " | ".join(_peer_value(c, k) for k in columns) + " |")
    if peers["ratios"]:
        lines += ["", "Ratio zoomin / peer (time, memory, size: < 1 means zoomin is better; tok/s: > 1 means "
                      "zoomin is better).", "",
                  "| precision | peer | image encode | text prefill | decode | ZoomIn job | peak RSS | on disk |",
                  "|---|---|---|---|---|---|---|---|"]
        for precision in PEER_PRECISIONS:
            for label, row in peers["ratios"].get(precision, {}).items():
                lines.append(f"| {precision} | {configs[label]['runtime']} | "
                             + " | ".join(_x(row[k]) for k in columns) + " |")
    missing = [f"- {name}: {why}" for name, why in peers["skipped"].items()]
    missing += [f"- {label}: {why}" for label, why in peers["failed"].items()]
    if missing:
        lines += ["", "Peers not measured:", "", *missing]
    noted = [f"- {label}: " + "; ".join(configs[label]["notes"] + _job_tokens(configs[label]["job_tokens"]))
             for label in order if configs[label]["notes"] or configs[label]["job_tokens"]]
    if noted:
        lines += ["", "What each ran:", "", *noted]
    versions = "; ".join(f"{name}: " + ", ".join(f"{k} {v}" for k, v in vs.items() if v)
                         for name, vs in peers["versions"].items())
    lines += ["", f"Versions: {versions}"]
    return lines


def _token_check(check: dict) -> str:
    if check["equal"]:
        return "equal for every configuration and image"
    return "MISMATCH: " + "; ".join(check["mismatches"]) if check["mismatches"] else "no baseline to compare with"


def _met(v) -> str:
    return "n/a" if v is None else "yes" if v else "no"


def plot(results: dict, folder: Path) -> dict[str, Path]:
    """stages.png (stacked stage times per configuration, reference image) and latency.png (end to end vs size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = _labels(results)
    if not labels:
        return {}
    ref = results["settings"]["reference_image"]
    out = {"stages": folder / "stages.png", "latency": folder / "latency.png"}

    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.6 * len(labels)))
    cmap = plt.get_cmap("tab10")
    segments = (*STAGES, "other")
    for i, label in enumerate(labels):
        left = 0.0
        for k, key in enumerate(segments):
            v = max(results["configs"][label]["images"][ref]["metrics"][key]["median"], 0.0) / 1e3
            ax.barh(i, v, left=left, color=cmap(k % 10) if k < 10 else "lightgray",
                    label=ROW_LABELS[key] if i == 0 else None)
            left += v
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (median)")
    ax.set_title(f"Where the time goes: {_image_line(results, ref)}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25 if len(labels) > 2 else -0.4), ncol=5, fontsize=8)
    fig.tight_layout()
    fig.savefig(out["stages"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in labels:
        pts = []
        for path in results["images"]:
            img = results["configs"][label]["images"][path]
            mw, mh = img["model_size"]
            st = img["metrics"]["total"]
            pts.append((mw * mh // PIXELS_PER_TOKEN, st["median"] / 1e3, st["q1"] / 1e3, st["q3"] / 1e3))
        pts.sort()
        x, y, lo, hi = zip(*pts)
        ax.errorbar(x, y, yerr=[[a - b for a, b in zip(y, lo)], [b - a for a, b in zip(y, hi)]], marker="o",
                    capsize=3, label=label)
    ax.set_xlabel("image tokens of the full image (query 1)")
    ax.set_ylabel("end-to-end latency, s (median, IQR bars)")
    ax.set_title("Latency vs image size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out["latency"], dpi=110)
    plt.close(fig)
    return out
