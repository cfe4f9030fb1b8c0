"""HTML report for face verification: ROC and DET curves, TPR at the targets, score histograms, summary.

Plots are PNG files beside ``report.html`` referenced by relative paths; no scripts, no CDN: the page
opens from disk in any browser.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np


def write_face_report(out_dir: str | Path, results: dict, curve, summary: dict[str, str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ok = (curve.fpr > 0) & (curve.tpr > 0)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.semilogx(curve.fpr[ok], curve.tpr[ok], label="ROC")
    for t, r in results.items():
        if r.estimable and r.tpr is not None:
            ax.plot([r.fpr or t], [r.tpr], "o", label=f"TPR@{t:g} = {r.tpr:.4f}")
    ax.set(xlabel="FPR (log)", ylabel="TPR", title="ROC (accept when score >= t)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # an empty legend makes matplotlib warn
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.loglog(curve.fpr[ok], np.clip(1 - curve.tpr[ok], 1e-6, 1))
    ax.set(xlabel="FPR (log)", ylabel="FNR (log)", title="DET")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "det.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    centres = curve.thresholds + (curve.thresholds[1] - curve.thresholds[0]) / 2
    for hist, name in ((curve.genuine_hist, "genuine"), (curve.impostor_hist, "impostor")):
        if hist.sum():
            ax.plot(centres, hist / hist.sum(), label=f"{name} ({int(hist.sum()):,} pairs)")
    ax.set(xlabel="cosine score", ylabel="share of pairs", title="score distributions")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "hist.png", dpi=110)
    plt.close(fig)

    rows = []
    for t, r in results.items():
        if r.estimable:
            tpr = "n/a" if r.tpr is None else f"{r.tpr:.6f}"
            rows.append(f"<tr><td>{t:g}</td><td>{tpr}</td><td>{r.threshold:.6f}</td><td>{r.fpr:.3e}</td>"
                        f"<td>{r.true_accepts:,} / {r.genuine_count:,}</td><td>{r.false_accepts:,} / "
                        f"{r.impostor_count:,}</td><td>{r.near_threshold_pairs}</td></tr>")
        else:
            rows.append(f"<tr><td>{t:g}</td><td colspan=6>not estimable: {html.escape(r.reason)}</td></tr>")
    summ = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>visrec face verification report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:4px 8px;text-align:left}}img{{margin:8px}}</style></head><body>
<h1>Face verification</h1>
<h2>Summary</h2><table>{summ}</table>
<h2>TPR at FPR (exact, strict rule: accept score &ge; t, highest TPR with FPR &le; target)</h2>
<table><tr><th>target FPR</th><th>TPR</th><th>threshold t</th><th>achieved FPR</th><th>true accepts</th>
<th>false accepts</th><th>pairs within float32 rounding of t</th></tr>{''.join(rows)}</table>
<h2>Curves (from score histograms; the table above is exact)</h2>
<img src="roc.png" alt="ROC"><img src="det.png" alt="DET"><img src="hist.png" alt="score histograms">
</body></html>"""
    path = out / "report.html"
    path.write_text(page)
    return path
