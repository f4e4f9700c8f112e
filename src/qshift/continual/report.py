"""The Markdown report of a continual run."""

from __future__ import annotations

from pathlib import Path

from qshift.io import read_json, write_text


def write_markdown(out: Path) -> Path:
    s = read_json(out / "results.json")
    cfg = s["config"]
    lines = [f"# Continual retrieval: {cfg['name']}", "",
             f"Encoder `{cfg['encoder']}`; domains {', '.join(s['domains'])} (orders {cfg['orders']}); OOD "
             f"{', '.join(s['ood'])}; gallery policy `{cfg['gallery']}`. R@1 = mean of T2I and I2T.", "",
             "| method | average R@1 (last step) | BWT | forgetting | FWT | OOD R@1 |", "|---|---:|---:|---:|---:|---:|"]
    for m, r in s["mean_over_orders"].items():
        lines.append(f"| {m} | {r['average_r1']:.2f} | {r['bwt']:+.2f} | {r['forgetting']:.2f} | "
                     f"{r.get('fwt', float('nan')):+.2f} | {r.get('ood_r1', float('nan')):.2f} |")
    lines += ["", "![matrix](matrix.png)", ""]
    for m, per in s["results"].items():
        first = per[next(iter(per))]
        lines += [f"## {m} — order {', '.join(first['order'])}", "",
                  "| after | " + " | ".join(first["order"]) + " |", "|---|" + "---:|" * len(first["order"])]
        for d, row in zip(first["order"], first["matrix"]):
            lines.append(f"| {d} | " + " | ".join(f"{v:.1f}" for v in row) + " |")
        lines.append("")
    path = out / "report.md"
    write_text(path, "\n".join(lines))
    return path
