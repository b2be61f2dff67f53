"""HTML evaluation report with matplotlib PNGs (per-region accuracy, reliability, confusions).

matplotlib is in the ``train`` extra; it is imported here only, with the non-interactive
Agg backend, so evaluation on a headless server works.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any


def _plots(metrics: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    regions = metrics["per_region"]
    if regions:
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(regions) + 1.5))
        labels = list(regions)
        y = range(len(labels))
        ax.barh([v - 0.2 for v in y], [regions[r]["final_top1"] for r in labels], height=0.4, label="final top-1")
        ax.barh([v + 0.2 for v in y], [regions[r]["coarse_top1"] for r in labels], height=0.4, label="coarse top-1")
        ax.set_yticks(list(y), [f"{r} (n={regions[r]['n']})" for r in labels])
        ax.set_xlim(0, 1)
        ax.set_xlabel("accuracy")
        ax.legend(loc="lower right")
        ax.set_title("Accuracy per region")
        fig.tight_layout()
        fig.savefig(out / "per_region.png", dpi=110)
        plt.close(fig)
        names.append("per_region.png")
    rel = metrics["reliability"]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    if rel["bins"]:
        ax.bar([b["lo"] for b in rel["bins"]], [b["accuracy"] for b in rel["bins"]], width=0.1, align="edge",
               alpha=0.6, edgecolor="k", label="accuracy")
        ax.plot([b["confidence"] for b in rel["bins"]], [b["accuracy"] for b in rel["bins"]], "o-", label="bin mean")
    ax.set_xlabel(f"confidence ({metrics['confidence']})")
    ax.set_ylabel("final top-1 accuracy")
    ax.set_title(f"Reliability (ECE {rel['ece']:.3f}, n={rel['n']})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=110)
    plt.close(fig)
    names.append("reliability.png")
    conf = metrics["confusions"]
    if conf:
        fig, ax = plt.subplots(figsize=(9, 0.4 * len(conf) + 1.5))
        ax.barh(range(len(conf)), [c["count"] for c in conf])
        ax.set_yticks(range(len(conf)), [f"{c['truth']} -> {c['predicted']}" for c in conf])
        ax.invert_yaxis()
        ax.set_xlabel("lesions")
        ax.set_title("Most frequent errors (truth -> prediction)")
        fig.tight_layout()
        fig.savefig(out / "confusions.png", dpi=110)
        plt.close(fig)
        names.append("confusions.png")
    return names


def _pct(v: float) -> str:
    return "n/a" if v != v else f"{100 * v:.1f}%"


def _pct_ci(m: dict[str, Any], key: str) -> str:
    """``91.2%`` or, when the block has bootstrap intervals, ``91.2% [89.0, 93.1]``."""
    ci = m.get("intervals", {}).get(key)
    return _pct(m[key]) + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def write_report(metrics: dict[str, Any], out_dir: str | Path, *, title: str, notes: str = "") -> Path:
    """Write ``metrics.json``, the PNGs and ``index.html`` into ``out_dir``; returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    images = _plots(metrics, out)
    rows = "".join(
        f"<tr><td>{html.escape(r)}</td><td>{m['n']}</td><td>{m.get('outside_vocabulary', '')}</td>"
        + "".join(f"<td>{_pct_ci(m, k)}</td>" for k in ("final_top1", "final_top3", "coarse_top1", "coarse_top3"))
        + "</tr>"
        for r, m in [("all", metrics), *(("nameable lesions only", metrics["nameable"]),) * ("nameable" in metrics),
                     *metrics["per_region"].items()])
    outside = "".join(f"<li>{html.escape(c['truth'])}: {c['count']}</li>"
                      for c in metrics.get("outside_vocabulary_sites", []))
    boot = metrics.get("bootstrap")
    ci_note = (f"Brackets: {100 * boot['level']:.0f} % percentile intervals, {boot['resamples']} bootstrap resamples "
               f"of whole studies (seed {boot['seed']})." if boot else "")
    conf = "".join(f"<tr><td>{html.escape(c['truth'])}</td><td>{html.escape(c['predicted'])}</td><td>{c['count']}</td></tr>"
                   for c in metrics["confusions"])
    imgs = "".join(f'<p><img src="{n}" alt="{n}"></p>' for n in images)
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td,th{{padding:2px 8px;border-bottom:1px solid #ddd}}</style>
</head><body><h1>{html.escape(title)}</h1><p>{html.escape(notes)}</p>
<p>Protocol: HCL-AL's (per study, predicted and ground-truth boxes matched by 3-D IoU &gt; 0.5; correct when the
prediction is one of the acceptable final strings). Unmatched ground-truth lesions: {metrics['unmatched']}.
Lesions whose site the model vocabulary cannot name ("outside vocab."; counted wrong):
{metrics.get('outside_vocabulary', 'not counted')}. {ci_note}</p><ul>{outside}</ul>
<table><tr><th>region</th><th>n</th><th>outside vocab.</th><th>final top-1</th><th>final top-3</th><th>coarse top-1</th><th>coarse top-3</th></tr>
{rows}</table><h2>Most frequent errors</h2><table><tr><th>truth</th><th>predicted</th><th>n</th></tr>{conf}</table>
<h2>Plots</h2>{imgs}</body></html>
"""
    path = out / "index.html"
    path.write_text(doc, encoding="utf-8")
    return path
