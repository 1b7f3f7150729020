"""The evaluation report: JSON, a printed table and a PNG bar chart (PIL only).

Layout of report.json: `systems.<name>.{mode, benchmarks.<bench>.{n, correct,
accuracy, ci95, fallbacks, categories.<cat>...}}` and `comparisons: [{a, b,
benchmarks.<bench>.{diff, ci95, a_only, b_only, significant, categories}}]`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Sequence
from pathlib import Path

from insightv_jax.eval.metrics import ItemResult, compare, summarize


def build_report(
    results: dict[str, list[ItemResult]],
    modes: dict[str, str],
    pairs: Sequence[tuple[str, str]] = (),
    method: str = "bootstrap",
    n_boot: int = 2000,
    seed: int = 0,
    meta: dict | None = None,
) -> dict:
    """Accuracy per system (per benchmark / category) and paired comparisons."""
    return {
        "meta": {"date": datetime.date.today().isoformat(), "seed": seed, **(meta or {})},
        "systems": {
            name: {"mode": modes.get(name, ""), "benchmarks": summarize(rs)}
            for name, rs in results.items()
        },
        "comparisons": [
            {"a": a, "b": b, "benchmarks": compare(results[a], results[b], method, n_boot, seed)}
            for a, b in pairs
        ],
    }


def _rows(report: dict) -> list[tuple[str, str, str | None]]:
    """(label, benchmark, category or None) in table order."""
    rows, seen = [], set()
    for sys_ in report["systems"].values():
        for bench, entry in sys_["benchmarks"].items():
            if (bench, None) not in seen:
                seen.add((bench, None))
                rows.append((bench, bench, None))
            for cat in entry.get("categories", {}):
                if (bench, cat) not in seen:
                    seen.add((bench, cat))
                    rows.append((f"  {cat}", bench, cat))
    return rows


def _entry(entry: dict | None, cat: str | None) -> dict | None:
    if entry is None:
        return None
    return entry if cat is None else entry.get("categories", {}).get(cat)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def format_table(report: dict) -> str:
    """Accuracy % [95% CI] (MC fallbacks) per row and system, then the paired
    differences; `*` marks a difference whose CI excludes 0."""
    names = list(report["systems"])
    rows = _rows(report)
    width = max([len(r[0]) for r in rows] + [9])
    col = 24
    lines = ["accuracy % [95% CI] (fallbacks)"]
    lines.append("".ljust(width) + "".join(n[: col - 1].rjust(col) for n in names))
    for label, bench, cat in rows:
        cells = []
        for n in names:
            e = _entry(report["systems"][n]["benchmarks"].get(bench), cat)
            cells.append(
                "-"
                if e is None
                else f"{_pct(e['accuracy'])} [{_pct(e['ci95'][0])},{_pct(e['ci95'][1])}]"
                + (f" ({e['fallbacks']})" if e["fallbacks"] else "")
            )
        lines.append(label.ljust(width) + "".join(c.rjust(col) for c in cells))
    for comp in report["comparisons"]:
        lines.append("")
        lines.append(f"{comp['a']} - {comp['b']} (paired 95% CI, points)")
        for label, bench, cat in rows:
            e = _entry(comp["benchmarks"].get(bench), cat)
            if e is None:
                continue
            mark = " *" if e["significant"] else ""
            lines.append(
                label.ljust(width + 2)
                + f"{100 * e['diff']:+.1f} [{100 * e['ci95'][0]:+.1f}, {100 * e['ci95'][1]:+.1f}]"
                + f"  n={e['n']}{mark}"
            )
    return "\n".join(lines)


COLOURS = [(66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88), (171, 71, 188),
           (0, 172, 193), (255, 112, 67), (158, 157, 36)]  # fmt: skip


def draw_chart(report: dict, path: str | Path) -> None:
    """A grouped bar chart (rows x systems) of accuracy with 95% CI whiskers."""
    from PIL import Image, ImageDraw, ImageFont

    names = list(report["systems"])
    rows = _rows(report)
    bar, gap, left, top, plot_h = 16, 18, 48, 28, 240
    group_w = bar * len(names) + gap
    width = max(left + group_w * len(rows) + 20, 360)
    legend_h = 16 * len(names) + 8
    height = top + plot_h + 70 + legend_h
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    y0 = top + plot_h  # the 0% line

    def y(frac: float) -> int:
        return int(round(y0 - frac * plot_h))

    draw.text((left, 6), "accuracy (%) with 95% CI", fill="black", font=font)
    for pct in range(0, 101, 20):
        draw.line([(left, y(pct / 100)), (width - 10, y(pct / 100))], fill=(220, 220, 220))
        draw.text((8, y(pct / 100) - 6), f"{pct}", fill="black", font=font)
    for g, (label, bench, cat) in enumerate(rows):
        x = left + g * group_w + gap // 2
        for s, name in enumerate(names):
            e = _entry(report["systems"][name]["benchmarks"].get(bench), cat)
            if e is None:
                continue
            x0 = x + s * bar
            draw.rectangle([x0, y(e["accuracy"]), x0 + bar - 3, y0], fill=COLOURS[s % len(COLOURS)])
            mid = x0 + (bar - 3) // 2
            lo, hi = y(e["ci95"][0]), y(e["ci95"][1])
            draw.line([(mid, lo), (mid, hi)], fill="black")
            draw.line([(mid - 3, lo), (mid + 3, lo)], fill="black")
            draw.line([(mid - 3, hi), (mid + 3, hi)], fill="black")
        text = label.strip()[: max(3, group_w // 6)]
        draw.text((x, y0 + 6 + 12 * (g % 2)), text, fill="black", font=font)
    draw.line([(left, y0), (width - 10, y0)], fill="black")
    for s, name in enumerate(names):
        ly = y0 + 44 + 16 * s
        draw.rectangle([left, ly, left + 10, ly + 10], fill=COLOURS[s % len(COLOURS)])
        mode = report["systems"][name]["mode"]
        draw.text((left + 16, ly - 1), f"{name} ({mode})", fill="black", font=font)
    img.save(path, format="PNG")


def write_report(report: dict, results: dict[str, list[ItemResult]], out: str | Path) -> str:
    """Write out/report.json, report.txt, report.png and predictions.jsonl (one
    line per system and question); returns the table text."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    table = format_table(report)
    (out / "report.txt").write_text(table + "\n")
    draw_chart(report, out / "report.png")
    with (out / "predictions.jsonl").open("w") as f:
        for name, rs in results.items():
            for r in rs:
                f.write(json.dumps({"system": name, **dataclasses.asdict(r)}) + "\n")
    return table
