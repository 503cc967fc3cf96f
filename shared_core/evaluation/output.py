"""What an evaluation leaves in its folder once every case is done: metrics.json, grid.png, strength.png, report.html."""

from __future__ import annotations

import base64
import html
import io
import json
import os
from statistics import mean

from ..files import atomic_write
from .cases import DEFENCES, Case, Store
from .scores import pixel_change

CELL = 256  # the largest side of an image in the contact sheets
SMALLEST = 128  # smaller images (test renders) are enlarged to this, pixel for pixel


def merge(store: Store, cases: list[Case], info: dict) -> dict:
    """Read every case's record, compare each image with its plain twin, summarise, and write grid.png, strength.png and
    report.html; returns the metrics, which the caller writes to metrics.json once its timing is complete."""
    rows = []
    plain = {}
    for case in cases:
        record = store.record(case)
        scores = dict(record.get("scores") or {})
        if case.defence != "none":
            ref = case.reference
            if ref.id not in plain:
                plain[ref.id] = store.image(ref)
            scores["pixel_change"] = pixel_change(store.image(case), plain[ref.id])
        rows.append({**record["case"], "id": case.id, "scores": scores, "render_seconds": record.get("render_seconds"),
                     "scoring_seconds": record.get("scoring_seconds")})
    metrics = {**info, "cases": rows, "summary": summary(rows), "strength_sweep": sweep(rows)}
    timing = metrics.setdefault("timing", {})
    timing["render_seconds_in_records"] = round(sum(r["render_seconds"] or 0.0 for r in rows), 3)
    write(store, "grid.png", _png(contact_sheet(store, cases)))
    strip = strength_strip(store, cases)
    if strip is not None:
        write(store, "strength.png", _png(strip))
    write(store, "report.html", html_report(metrics, store, strip).encode("utf-8"))
    return metrics


def write(store: Store, name: str, body: bytes) -> str:
    """An output file of the evaluation folder (ours: replaced on every merge), atomically."""
    return atomic_write(os.path.join(store.folder, name), lambda f: f.write(body), overwrite=True, is_ours=lambda p: True,
                        what=name)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _values(rows, group, defence, pick):
    vals = [pick(r["scores"]) for r in rows if r["group"] == group and r["defence"] == defence and r["strength"] == 1.0]
    return [v for v in vals if v is not None]


SCORE_VIEWS = {  # name in the summary -> how it is read from a case's scores
    "pixel_change": lambda s: (s.get("pixel_change") or {}).get("mean_abs"),
    "nude_rate": lambda s: None if "nudenet" not in s else float(s["nudenet"]["nude"]),
    "clip_score": lambda s: (s.get("clip") or {}).get("clip_score"),
    "concept_probability": lambda s: (s.get("clip") or {}).get("concept_probability"),
}


def summary(rows: list[dict]) -> dict:
    """{group: {defence: {score: mean over its prompts and seeds}}} for the scores the cases have."""
    out: dict = {}
    for group in dict.fromkeys(r["group"] for r in rows):
        for defence in [d for d in DEFENCES if any(r["defence"] == d for r in rows)]:
            means = {name: round(mean(v), 4) for name, pick in SCORE_VIEWS.items() if (v := _values(rows, group, defence, pick))}
            means["cases"] = sum(1 for r in rows if r["group"] == group and r["defence"] == defence and r["strength"] == 1.0)
            out.setdefault(group, {})[defence] = means
    return out


def sweep(rows: list[dict]) -> list[dict]:
    """The patches' strength sweep (strength 0 = the plain image), with each score."""
    swept = [r for r in rows if r["defence"] == "patch"]
    if not swept or len({r["strength"] for r in swept}) < 2:
        return []
    first = swept[-1]  # the sweep is on the plan's first prompt and seed
    points = [r for r in swept if (r["prompt"], r["seed"]) == (first["prompt"], first["seed"])]
    base = next(r for r in rows if r["defence"] == "none" and (r["prompt"], r["seed"]) == (first["prompt"], first["seed"]))
    out = []
    for r in [base] + sorted(points, key=lambda r: r["strength"]):
        entry = {"strength": 0.0 if r["defence"] == "none" else r["strength"], "id": r["id"]}
        entry.update({k: pick(r["scores"]) for k, pick in SCORE_VIEWS.items() if pick(r["scores"]) is not None})
        if r is base:
            entry["pixel_change"] = 0.0  # the plain image itself
        out.append(entry)
    return out


def _label(image, text: str):
    from PIL import Image, ImageDraw

    band = Image.new("RGB", (image.width, 14), "white")
    ImageDraw.Draw(band).text((2, 1), text[: max(4, image.width // 6)], fill="black")
    out = Image.new("RGB", (image.width, image.height + 14), "white")
    out.paste(band, (0, 0))
    out.paste(image, (0, 14))
    return out


def _thumb(image):
    from PIL import Image

    image = image.copy()
    image.thumbnail((CELL, CELL))
    if max(image.size) < SMALLEST:
        factor = -(-SMALLEST // max(image.size))
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    return image


def contact_sheet(store: Store, cases: list[Case]):
    """Rows: prompts (their first seed); columns: without, patch, NLCE, both."""
    from PIL import Image

    defences = [d for d in DEFENCES if any(c.defence == d for c in cases)]
    firsts: dict[str, Case] = {}
    for c in cases:
        firsts.setdefault(c.prompt, c)
    cells = {(c.prompt, c.defence): c for c in cases if c.strength == 1.0 and c.seed == firsts[c.prompt].seed}
    sample = _thumb(store.image(next(iter(cells.values()))))
    w, h = sample.width, sample.height + 14
    sheet = Image.new("RGB", (w * len(defences), h * len(firsts)), "white")
    for i, prompt in enumerate(firsts):
        for j, d in enumerate(defences):
            if (prompt, d) in cells:
                label = ("without" if d == "none" else d) + (f" | {prompt}" if j == 0 else "")
                sheet.paste(_label(_thumb(store.image(cells[(prompt, d)])), label), (j * w, i * h))
    return sheet


def strength_strip(store: Store, cases: list[Case]):
    """The strength sweep side by side (strength 0 first), or None without one."""
    from PIL import Image

    swept = [c for c in cases if c.defence == "patch" and c.strength != 1.0]
    if not swept:
        return None
    first = swept[0]
    row = [first.reference] + sorted([c for c in cases if c.defence == "patch" and (c.prompt, c.seed) == (first.prompt, first.seed)],
                                     key=lambda c: c.strength)
    images = [_label(_thumb(store.image(c)), f"strength {0.0 if c.defence == 'none' else c.strength:g}") for c in row]
    strip = Image.new("RGB", (sum(i.width for i in images), images[0].height), "white")
    x = 0
    for image in images:
        strip.paste(image, (x, 0))
        x += image.width
    return strip


# ---------------------------------------------------------------------------------------------- the HTML page

def _data_uri(image) -> str:
    return "data:image/png;base64," + base64.b64encode(_png(image)).decode()


def _line_plot(points: list[dict], keys: list[str], title: str) -> str:
    """An SVG line chart of each score against strength."""
    w, h, pad = 420, 220, 40
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    xs = [p["strength"] for p in points]
    x_max = max(xs) or 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - 10}" y2="{h - pad}" stroke="#444"/>',
             f'<line x1="{pad}" y1="{h - pad}" x2="{pad}" y2="24" stroke="#444"/>',
             f'<text x="{w / 2}" y="{h - 8}" text-anchor="middle" font-size="11">patch strength</text>']
    for k, key in enumerate(keys):
        ys = [p.get(key) for p in points]
        if any(y is None for y in ys):
            continue
        if max(ys) == 0:
            parts.append(f'<text x="{w - 12}" y="{30 + 14 * k}" text-anchor="end" font-size="11" fill="{colours[k % 4]}">'
                         f'{html.escape(key)}: 0 at every strength</text>')
            continue
        y_max = max(ys)
        coords = [(pad + (x / x_max) * (w - pad - 20), (h - pad) - (y / y_max) * (h - pad - 34)) for x, y in zip(xs, ys)]
        parts.append(f'<polyline fill="none" stroke="{colours[k % 4]}" stroke-width="2" '
                     f'points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in coords)}"/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colours[k % 4]}"/>' for x, y in coords]
        parts.append(f'<text x="{w - 12}" y="{30 + 14 * k}" text-anchor="end" font-size="11" fill="{colours[k % 4]}">'
                     f'{html.escape(key)} (max {y_max:.3g})</text>')
    parts += [f'<text x="{pad + (x / x_max) * (w - pad - 20):.1f}" y="{h - pad + 14}" text-anchor="middle" font-size="10">'
              f'{x:g}</text>' for x in xs]
    return "".join(parts) + "</svg>"


def _bar_plot(summary_: dict, key: str, title: str) -> str:
    """An SVG bar chart of one score per prompt group, a bar per defence."""
    groups = [g for g in summary_ if any(key in v for v in summary_[g].values())]
    if not groups:
        return ""
    defences = [d for d in DEFENCES if any(d in summary_[g] for g in groups)]
    values = [summary_[g].get(d, {}).get(key) for g in groups for d in defences]
    top = max([v for v in values if v is not None] + [0.0])
    if top == 0:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="360" height="40" role="img"><text x="8" y="24" '
                f'font-size="13">{html.escape(title)}: 0 for every group and defence</text></svg>')
    w, h, pad, bar = 60 + 90 * len(groups), 220, 40, 16
    colours = {"none": "#999", "patch": "#1f77b4", "nlce": "#ff7f0e", "both": "#2ca02c"}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - 10}" y2="{h - pad}" stroke="#444"/>']
    for i, g in enumerate(groups):
        x0 = pad + 10 + i * 90
        for j, d in enumerate(defences):
            v = summary_[g].get(d, {}).get(key)
            if v is None:
                continue
            height = (v / top) * (h - pad - 40)
            parts.append(f'<rect x="{x0 + j * bar}" y="{h - pad - height:.1f}" width="{bar - 2}" height="{height:.1f}" '
                         f'fill="{colours[d]}"><title>{html.escape(g)} / {d}: {v}</title></rect>')
        parts.append(f'<text x="{x0 + len(defences) * bar / 2}" y="{h - pad + 14}" text-anchor="middle" font-size="11">'
                     f'{html.escape(g)}</text>')
    legend = " ".join(f'<tspan fill="{colours[d]}">{d}</tspan>' for d in defences)
    parts.append(f'<text x="{w - 12}" y="30" text-anchor="end" font-size="11">{legend}</text>')
    return "".join(parts) + "</svg>"


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape('' if c is None else str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_report(metrics: dict, store: Store, strip) -> str:
    """One self-contained page: settings, the summary table, plots, the contact sheet, the sweep, the text-level report
    and the attack, what produced each number."""
    from PIL import Image

    settings = metrics.get("settings", {})
    summary_ = metrics["summary"]
    score_keys = [k for k in SCORE_VIEWS if any(k in v for g in summary_.values() for v in g.values())]
    rows = [[g, d, v.get("cases"), *[v.get(k) for k in score_keys]] for g, by in summary_.items() for d, v in by.items()]
    with Image.open(os.path.join(store.folder, "grid.png")) as im:
        grid = _data_uri(im.convert("RGB"))
    sections = [
        f"<h1>Erasure evaluation: {html.escape(', '.join(settings.get('concepts', [])))}</h1>",
        f"<p>Model <code>{html.escape(str(settings.get('model')))}</code> ({html.escape(str(metrics.get('family')))}), "
        f"{settings.get('steps')} steps, {settings.get('size')} px, seeds {settings.get('seeds')}, guidance "
        f"{settings.get('guidance')}. Defences: {html.escape(', '.join(settings.get('defences', [])))}. "
        f"{len(metrics['cases'])} images.</p>",
        "<h2>Summary (mean per prompt group and defence)</h2>",
        "<p>pixel_change: mean absolute pixel difference from the same prompt and seed without any defence (0..1); "
        "nude_rate: share of images NudeNet flags; clip_score / concept_probability: from the CLIP model named below. "
        "A score whose model did not run is absent, not zero.</p>",
        _table(["group", "defence", "images", *score_keys], rows),
        "<h2>Plots</h2>",
        "".join(_bar_plot(summary_, k, f"{k} per prompt group") for k in score_keys),
    ]
    if metrics.get("strength_sweep"):
        keys = [k for k in SCORE_VIEWS if any(k in p for p in metrics["strength_sweep"])]
        sections += [_line_plot(metrics["strength_sweep"], keys, "scores against patch strength"),
                     "<h2>Strength sweep</h2>", f'<img alt="strength sweep" src="{_data_uri(strip)}">']
    firsts = list(dict.fromkeys((r["prompt"], r["group"]) for r in metrics["cases"]))
    sections += ["<h2>Images (rows: prompts; columns: without and with each defence)</h2>",
                 f'<img alt="contact sheet" src="{grid}">',
                 "<ol>" + "".join(f"<li>{html.escape(p)} <small>({html.escape(g)})</small></li>" for p, g in firsts) + "</ol>"]
    for name, report in (metrics.get("text_reports") or {}).items():
        sections += [f"<h2>Text-level report of {html.escape(name)}</h2>",
                     _table(["measure", "value"], [[k, v] for k, v in report.items() if not isinstance(v, list)])]
    if metrics.get("attack"):
        attack = metrics["attack"]
        sections += ["<h2>Text attack (Ring-A-Bell-style search)</h2>",
                     f"<p>The bare concept under the patch: cosine {attack['baseline_cosine']} to its original encoding. "
                     f"Best prompts found (settings in metrics.json):</p>",
                     _table(["prompt", "cosine"], [[b["prompt"], b["cosine"]] for b in attack["best"]])]
    sections += ["<h2>What produced these numbers</h2>",
                 f"<pre>{html.escape(json.dumps({k: metrics.get(k) for k in ('versions', 'scorers', 'timing')}, indent=2))}</pre>"]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:1em auto;padding:0 1em}table{border-collapse:collapse;"
             "margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px}img{max-width:100%;"
             "border:1px solid #ddd;image-rendering:pixelated}svg{margin:4px;border:1px solid #eee}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>hirm eval</title><style>{style}</style></head>"
            f"<body>{''.join(sections)}</body></html>")
