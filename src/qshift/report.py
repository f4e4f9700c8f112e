"""Reports from benchmark results (``qshift report RESULTS``): Markdown, a standalone
HTML page (plots inlined) and PNG plots.

Tables follow the seeds' layout: one row per method, one column per corruption type
(R@1 at one severity, averaged over seeds) and the mean over types; a clean column
when clean cells exist. Plots: mean R@1 against severity per method, R@1 per type at
the highest severity, and R@1 along the query stream (adaptation curve).
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from qshift.errors import InputError
from qshift.io import atomic_path, write_text


def load_results(paths: list[Path]) -> pd.DataFrame:
    rows = []
    for p in paths:
        f = p / "cells.jsonl" if p.is_dir() else p
        if not f.is_file():
            raise InputError(f"{p}: no cells.jsonl (run `qshift bench CONFIG` first)")
        for line in f.read_text("utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                rows.append({**{k: v for k, v in r.items() if k not in ("metrics",)}, **r["metrics"]})
    if not rows:
        raise InputError(f"{', '.join(map(str, paths))}: no results")
    return pd.DataFrame(rows)


def type_table(df: pd.DataFrame, severity: int, metric: str = "R@1") -> pd.DataFrame:
    """Rows = methods, columns = corruption types at ``severity`` (+ mean, + clean)."""
    methods = list(dict.fromkeys(df["method"]))
    sub = df[(df["severity"] == severity) & ~df["shift"].str.startswith("stream:") & (df["shift"] != "clean")]
    table = sub.pivot_table(index="method", columns="shift", values=metric, aggfunc="mean", sort=False)
    if not table.empty:
        table["mean"] = table.mean(axis=1)
    clean = df[df["shift"] == "clean"].groupby("method", sort=False)[metric].mean()
    if len(clean):
        table.insert(0, "clean", clean)
    return table.reindex([m for m in methods if m in table.index])


def stream_table(df: pd.DataFrame, metric: str = "R@1") -> pd.DataFrame:
    sub = df[df["shift"].str.startswith("stream:")]
    if sub.empty:
        return pd.DataFrame()
    return sub.pivot_table(index="method", columns="shift", values=metric, aggfunc="mean", sort=False)


def _md(table: pd.DataFrame, digits: int = 2) -> str:
    cols = list(table.columns)
    lines = ["| method | " + " | ".join(str(c) for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for idx, row in table.iterrows():
        lines.append(f"| {idx} | " + " | ".join("" if pd.isna(v) else f"{v:.{digits}f}" for v in row) + " |")
    return "\n".join(lines)


def _html_table(table: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    body = []
    for idx, row in table.iterrows():
        vals = row.to_numpy(dtype=float)
        best = np.nanmax(vals) if np.isfinite(vals).any() else None
        cells = "".join(f"<td{' class=best' if best is not None and v == best else ''}>"
                        f"{'' if np.isnan(v) else f'{v:.2f}'}</td>" for v in vals)
        body.append(f"<tr><th>{html.escape(str(idx))}</th>{cells}</tr>")
    return f"<table><tr><th>method</th>{head}</tr>{''.join(body)}</table>"


def plot_severity(df: pd.DataFrame, path: Path, metric: str = "R@1") -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sub = df[~df["shift"].str.startswith("stream:")]
    if sub["severity"].nunique() < 2:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for method, g in sub.groupby("method", sort=False):
        curve = g.groupby("severity")[metric].mean()
        ax.plot(curve.index, curve.values, marker="o", label=method)
    ax.set_xlabel("severity (0 = clean)")
    ax.set_ylabel(f"{metric} (%), mean over corruption types")
    ax.set_xticks(sorted(sub["severity"].unique()))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{metric} under query shift: {', '.join(sorted(set(df['name'])))}", fontsize=10)
    _save(fig, path)
    return True


def plot_types(df: pd.DataFrame, path: Path, severity: int, metric: str = "R@1") -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = type_table(df, severity, metric).drop(columns=["mean"], errors="ignore")
    if table.empty or table.shape[1] < 1:
        return False
    methods, types = list(table.index), list(table.columns)
    fig, ax = plt.subplots(figsize=(max(6.4, 0.45 * len(types) * max(1, len(methods)) ** 0.5 + 2), 4.2), dpi=120)
    width = 0.8 / len(methods)
    x = np.arange(len(types))
    for i, m in enumerate(methods):
        ax.bar(x + i * width - 0.4 + width / 2, table.loc[m].to_numpy(dtype=float), width, label=m)
    ax.set_xticks(x)
    ax.set_xticklabels(types, rotation=55, ha="right", fontsize=8)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{metric} per corruption type, severity {severity}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def plot_curves(df: pd.DataFrame, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sub = df[df["shift"].str.startswith("stream:")]
    if sub.empty:
        sub = df[df["shift"] != "clean"]
        title = "R@1 along the query stream (mean over cells)"
    else:
        title = "R@1 along the query stream"
    if sub.empty or "curve_r1" not in sub:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    colors = {m: f"C{i % 10}" for i, m in enumerate(dict.fromkeys(sub["method"]))}  # colour = method,
    styles = {s: ("-", "--", ":", "-.")[i % 4] for i, s in enumerate(dict.fromkeys(sub["shift"]))}  # line = stream
    for (method, shift), g in sub.groupby(["method", "shift"] if sub["shift"].str.startswith("stream:").any()
                                          else ["method", sub["direction"]], sort=False):
        curves = np.array([c for c in g["curve_r1"] if len(c) == 10])
        if len(curves):
            label = f"{method} · {shift}" if str(shift).startswith("stream:") else method
            ax.plot(np.arange(1, 11) * 10, curves.mean(axis=0), marker=".", label=label, color=colors[method],
                    ls=styles.get(shift, "-"))
    ax.set_xlabel("position in the stream (%)")
    ax.set_ylabel("R@1 (%) in each tenth")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)
    return True


def _save(fig, path: Path) -> None:  # noqa: ANN001
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_report(results: list[Path], out: Path, metric: str = "R@1") -> dict:
    """Write report.md, report.html and the PNGs into ``out``; returns what was written."""
    df = load_results(results)
    out.mkdir(parents=True, exist_ok=True)
    sevs = sorted(s for s in df["severity"].unique() if s > 0)
    main_sev = max(sevs) if sevs else 0
    plots = {}
    if plot_severity(df, out / "r1_vs_severity.png", metric):
        plots["R@1 vs severity"] = "r1_vs_severity.png"
    if main_sev and plot_types(df, out / "r1_per_type.png", main_sev, metric):
        plots[f"R@1 per type (severity {main_sev})"] = "r1_per_type.png"
    if plot_curves(df, out / "adaptation_curve.png"):
        plots["adaptation curve"] = "adaptation_curve.png"

    names = ", ".join(sorted(set(df["name"])))
    enc = ", ".join(sorted(set(df["encoder"])))
    gens = sorted({(r["shift"], (r.get("shift_info") or {}).get("generator", "?")) for _, r in df.iterrows()
                   if r["shift"] != "clean" and not str(r["shift"]).startswith("stream:")})
    md = [f"# qshift benchmark report: {names}", "", f"Encoder: `{enc}`; direction: {', '.join(sorted(set(df['direction'])))}; "
          f"{int(df['queries'].max())} queries × {int(df['gallery'].max())} gallery items; seeds: "
          f"{', '.join(map(str, sorted(set(df['seed']))))}.", ""]
    sections = []
    for sev in sorted(sevs, reverse=True):
        t = type_table(df, sev, metric)
        if not t.empty:
            sections.append((f"{metric} per corruption type, severity {sev}", t))
    if not sevs:
        t = type_table(df, 0, metric)
        if not t.empty:
            sections.append((f"{metric}, clean queries", t))
    st = stream_table(df, metric)
    if not st.empty:
        sections.append((f"{metric} on query streams", st))
    full = df.groupby(["method", "shift", "severity"], sort=False)[
        [c for c in ("R@1", "R@5", "R@10", "MRR", "mAP@10", "nDCG@10") if c in df]].mean()
    for title, t in sections:
        md += [f"## {title}", "", _md(t), ""]
    if gens:
        md += ["## Generators", "", "| shift | generator |", "|---|---|"] + [f"| {s} | {g} |" for s, g in gens] + [""]
    for title, f in plots.items():
        md += [f"## {title}", "", f"![{title}]({f})", ""]
    write_text(out / "report.md", "\n".join(md))

    css = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
           "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px}"
           "td{text-align:right}td.best{font-weight:bold;background:#e8f4e8}img{max-width:100%}")
    body = [f"<h1>qshift benchmark report: {html.escape(names)}</h1>", f"<p>{html.escape(md[2])}</p>"]
    for title, t in sections:
        body += [f"<h2>{html.escape(title)}</h2>", _html_table(t)]
    for title, f in plots.items():
        b64 = base64.b64encode((out / f).read_bytes()).decode()
        body += [f"<h2>{html.escape(title)}</h2>", f'<img alt="{html.escape(title)}" src="data:image/png;base64,{b64}">']
    body += ["<h2>All cells (mean over seeds)</h2>", _html_table(full.reset_index().assign(
        row=lambda d: d["method"] + " · " + d["shift"] + " · s" + d["severity"].astype(str)).set_index("row")
        .drop(columns=["method", "shift", "severity"]))]
    write_text(out / "report.html", f"<!doctype html><html><head><meta charset='utf-8'><title>qshift report</title>"
                                    f"<style>{css}</style></head><body>{''.join(body)}</body></html>")
    return {"markdown": str(out / "report.md"), "html": str(out / "report.html"),
            "plots": [str(out / f) for f in plots.values()], "cells": len(df)}
