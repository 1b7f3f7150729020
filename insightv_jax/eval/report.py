"""The evaluation report: JSON, a printed table and a PNG bar chart (PIL only).

Layout of report.json: `systems.<name>.{mode, benchmarks.<bench>.{n, correct,
accuracy, ci95, fallbacks, categories.<cat>..., diagnostics}}` and `comparisons:
[{a, b, benchmarks.<bench>.{diff, ci95, a_only, b_only, significant, categories}}]`.

`diagnostics` (only for systems whose answers come from judged chains: two_agent,
given_chain) is `eval.diagnostics.diagnostics`: {n, chain_correct, chain_accuracy,
kept_right, broke_right, fixed_wrong, kept_wrong, overturn_rate, fix_rate,
categories.<cat>..., chain_kinds.<kind>...}, rates null when undefined.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Sequence
from pathlib import Path

from insightv_jax.eval.diagnostics import CELLS, CLEAN, diagnostics_by_benchmark
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
    """Accuracy per system (per benchmark / category), the chain diagnostics of
    systems answering from chains, and paired comparisons."""
    return {
        "meta": {"date": datetime.date.today().isoformat(), "seed": seed, **(meta or {})},
        "systems": {
            name: {"mode": modes.get(name, ""), "benchmarks": _summary(rs)}
            for name, rs in results.items()
        },
        "comparisons": [
            {"a": a, "b": b, "benchmarks": compare(results[a], results[b], method, n_boot, seed)}
            for a, b in pairs
        ],
    }


def _summary(results: list[ItemResult]) -> dict:
    """`summarize` with each benchmark's chain `diagnostics` where chains were judged."""
    summary = summarize(results)
    for bench, diag in diagnostics_by_benchmark(results).items():
        summary[bench]["diagnostics"] = diag
    return summary


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


def _rate(x: float | None) -> str:
    """A rate in % ("-" when undefined: no chain of that sort)."""
    return "-" if x is None else f"{_pct(x)}%"


DIAGNOSTICS_TITLE = "chain diagnostics: the summary agent's answer vs the chain it was given"


def _diagnostic_entries(report: dict) -> list[tuple[str, str]]:
    """(counts, rates) per system and benchmark with diagnostics: the chain
    accuracy and the four confusion counts; the overturn and fix rates (and the
    fix rate per kind of error, where the chains record one)."""
    out = []
    for name, sys_ in report["systems"].items():
        for bench, entry in sys_["benchmarks"].items():
            d = entry.get("diagnostics")
            if d is None:
                continue
            cells = ", ".join(f"{c.replace('_', ' ')} {d[c]}" for c in CELLS)
            counts = f"{name} on {bench}: chain {_pct(d['chain_accuracy'])}% (n={d['n']}); {cells}"
            rates = f"overturn {_rate(d['overturn_rate'])}, fix {_rate(d['fix_rate'])}"
            kinds = {k: v for k, v in d.get("chain_kinds", {}).items() if k != CLEAN}
            if kinds:  # given chains: does the summary agent repair text or image errors?
                rates += " (" + ", ".join(f"{k} {_rate(v['fix_rate'])}" for k, v in kinds.items())
                rates += ")"
            out.append((counts, rates))
    return out


def format_diagnostics(report: dict) -> str:
    """One line per system (and benchmark) answering from judged chains: chain
    accuracy %, kept right / broke right / fixed wrong / kept wrong, overturn and
    fix rates (and the fix rate per kind of error for given chains); "" if none."""
    entries = _diagnostic_entries(report)
    if not entries:
        return ""
    return "\n".join([DIAGNOSTICS_TITLE] + [f"{counts}; {rates}" for counts, rates in entries])


def format_table(report: dict) -> str:
    """Accuracy % [95% CI] (MC fallbacks) per row and system, the chain
    diagnostics (`format_diagnostics`), then the paired differences; `*` marks a
    difference whose CI excludes 0."""
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
    diag = format_diagnostics(report)
    if diag:
        lines += ["", diag]
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
    """A grouped bar chart (rows x systems) of accuracy with 95% CI whiskers, and
    under the legend the chain diagnostics as text (two lines per entry)."""
    from PIL import Image, ImageDraw, ImageFont

    names = list(report["systems"])
    rows = _rows(report)
    font = ImageFont.load_default()
    entries = _diagnostic_entries(report)
    notes = [DIAGNOSTICS_TITLE] if entries else []
    for counts, rates in entries:
        notes += [counts, "    " + rates]
    bar, gap, left, top, plot_h = 16, 18, 48, 28, 240
    group_w = bar * len(names) + gap
    text_w = max([int(font.getlength(t)) + 2 * left for t in notes] + [0])
    width = max(left + group_w * len(rows) + 20, 360, text_w)
    legend_h = 16 * len(names) + 8
    notes_y = top + plot_h + 70 + legend_h
    height = notes_y + (14 * len(notes) + 10 if notes else 0)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
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
    for i, note in enumerate(notes):
        draw.text((left, notes_y + 14 * i), note, fill="black", font=font)
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
