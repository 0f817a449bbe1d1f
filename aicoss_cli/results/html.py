"""report.html: one self-contained page per `aicoss report` — the run summary, the pictures, the
per-class table (sortable by clicking a column), the error galleries and the suspect labels.

Everything is inside the file (pictures and thumbnails as base64 data URLs, the style, a few lines
of plain JavaScript to sort the tables): no network, no framework. Each thumbnail links to its
image file, by a path relative to the report's folder. Every string that comes from a user's file
(class names, ids, paths, run names) is escaped. A page holding `PAGE_MARK` was written here and
may be rewritten; any other file named report.html is left alone.
"""

from __future__ import annotations

import base64
import io
import math
import os
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

import numpy as np

from aicoss_cli.base.console import clock
from aicoss_cli.base.files import write_text_atomic
from aicoss_cli.results.ensembles import EnsembleResult
from aicoss_cli.results.errors import SUSPECTS_SHOWN, ClassErrors, ErrorAnalysis, suspect_rows
from aicoss_cli.results.runs import Run

HTML_FILE = "report.html"
PAGE_MARK = '<meta name="generator" content="aicoss report">'
SUSPECT_ROWS = 200  # rows of the suspect table on the page; suspect_labels.csv holds them all
PICTURE_TITLES = {
    "curves": "training curves", "per_class_ap": "per-class AP", "ensemble_tradeoff": "ensemble trade-off",
    "pr_curves": "precision–recall curves", "cooccurrence": "what the false positives really are",
}

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;margin:0;background:#fafafa}
main{max-width:1240px;margin:0 auto;padding:0 20px 40px}
header{background:#1f3a5f;color:#fff;padding:14px 20px}header h1{margin:0;font-size:21px}
header p{margin:4px 0 0;opacity:.85}nav{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;
padding:7px 20px;z-index:2}nav a{margin-right:16px;color:#1f3a5f;text-decoration:none;font-weight:600}
h2{margin:28px 0 10px;font-size:18px;border-bottom:2px solid #1f3a5f33;padding-bottom:4px}
h3{margin:18px 0 4px;font-size:15px;overflow-wrap:anywhere}
table{border-collapse:collapse;background:#fff;font-size:13px}th,td{padding:4px 9px;border-bottom:1px solid #eee;
text-align:right;white-space:nowrap}th{background:#eef1f5;position:sticky;top:0}td.name,th.name{text-align:left}
td.name{max-width:26em;overflow:hidden;text-overflow:ellipsis}th[data-col]{cursor:pointer;user-select:none}
th[data-col]:after{content:" ⇅";color:#999}tr.weak td{background:#fdecec}.scroll{max-height:70vh;overflow:auto;
border:1px solid #ddd;display:inline-block;max-width:100%}dl.facts{display:grid;grid-template-columns:max-content 1fr;
gap:3px 16px;margin:0}dl.facts dt{color:#555}dl.facts dd{margin:0;overflow-wrap:anywhere}
.notes li{color:#8a5a00}figure.pic{margin:14px 0;background:#fff;border:1px solid #ddd;padding:8px}
figure.pic img{max-width:100%;height:auto;display:block}figcaption{font-size:12px;color:#555}
.strip{display:flex;gap:12px;align-items:flex-start;margin:6px 0}.kind{width:130px;flex:none;font-weight:600;
font-size:13px}.kind.fp{color:#c62828}.kind.fn{color:#1f77b4}.kind small{display:block;font-weight:400;color:#666}
.thumbs{display:flex;flex-wrap:wrap;gap:10px}figure.thumb{margin:0;width:100px;font-size:11px;line-height:1.3}
figure.thumb img,.missing{width:96px;height:96px;display:block;border:2px solid;image-rendering:auto}
figure.fp img,figure.fp .missing{border-color:#d62728}figure.fn img,figure.fn .missing{border-color:#1f77b4}
.missing{background:#e3e3e3;color:#555;font-size:10px;display:flex;align-items:center;justify-content:center;
text-align:center;overflow:hidden}figure.thumb figcaption{overflow-wrap:anywhere;color:#333}
figure.thumb b{display:block;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.labels{display:-webkit-box;-webkit-line-clamp:3;line-clamp:3;-webkit-box-orient:vertical;overflow:hidden}
#errors section p{margin:2px 0 8px}#errors h3{margin-top:22px}.none{color:#777;font-style:italic}td img{width:64px;height:64px;display:block}a{color:#1f5fa8}
"""

SCRIPT = """
document.querySelectorAll("th[data-col]").forEach(th => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0], i = th.cellIndex, down = th.dataset.dir !== "down";
  const key = row => { const c = row.cells[i]; return c.dataset.v !== undefined ? parseFloat(c.dataset.v) : NaN; };
  const text = row => row.cells[i].textContent;
  th.dataset.dir = down ? "down" : "up";
  const rows = Array.from(body.rows).sort((a, b) => {
    const x = key(a), y = key(b);
    if (isNaN(x) || isNaN(y)) return isNaN(x) - isNaN(y) || text(a).localeCompare(text(b));
    return down ? y - x : x - y;
  });
  rows.forEach(row => body.appendChild(row));
}));
"""


def is_report_page(path: Path) -> bool:
    """A page this module wrote: PAGE_MARK in its first kilobytes."""
    try:
        with open(path, "rb") as f:
            return PAGE_MARK.encode() in f.read(4096)
    except OSError:
        return False


def _num(value, digits: int = 4) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _cell(value, digits: int = 4) -> str:
    """A numeric <td> whose data-v the sort reads (none for no value: sorted last)."""
    if value is None or not math.isfinite(value):
        return "<td>–</td>"
    return f'<td data-v="{float(value)!r}">{_num(value, digits)}</td>'


def _link(path: str | None, out_dir: Path) -> str | None:
    """The image's address from the report's folder: a relative path where there is one."""
    if not path:
        return None
    try:
        rel = os.path.relpath(path, os.path.abspath(out_dir))
    except ValueError:  # another drive (Windows): an absolute file URL
        return Path(path).as_uri()
    return quote(rel.replace(os.sep, "/"))


def _data_url(png_or_array, kind: str = "png") -> str:
    if isinstance(png_or_array, np.ndarray):
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(png_or_array).save(buffer, format="JPEG", quality=90)
        raw, kind = buffer.getvalue(), "jpeg"
    else:
        raw = png_or_array
    return f"data:image/{kind};base64,{base64.b64encode(raw).decode('ascii')}"


def _thumb(a: ErrorAnalysis, row: int, out_dir: Path, caption: str, kind: str) -> str:
    d = a.data
    href = _link(d.paths[row], out_dir)
    if row in a.thumbs:
        inner = f'<img src="{_data_url(a.thumbs[row])}" alt="{escape(d.ids[row])}" width="96" height="96">'
    else:
        inner = f'<div class="missing">not readable:<br>{escape(a.unreadable.get(row, "not shown"))}</div>'
    if href:
        inner = f'<a href="{escape(href)}" title="{escape(d.ids[row])}">{inner}</a>'
    return f'<figure class="thumb {kind}">{inner}<figcaption>{caption}</figcaption></figure>'


def _gallery(a: ErrorAnalysis, g: ClassErrors, out_dir: Path) -> str:
    d, row = a.data, a.per_class[g.cls]
    t = a.thresholds.values[g.cls]
    parts = [f'<h3 title="{escape(d.classes[g.cls])}">{escape(d.classes[g.cls])}</h3>',
             f"<p>AP {_num(row['ap'], 3)} · {row['positives']} positives · {g.n_fp} false positives, {g.n_fn} false "
             f"negatives at threshold {t:.3g}</p>"]
    for rows, kind, title, order in ((g.fp, "fp", "false positives", "label 0, highest scores"),
                                     (g.fn, "fn", "false negatives", "label 1, lowest scores")):
        figures = []
        for r in rows:
            labels = ", ".join(d.classes[k] for k in np.flatnonzero(d.targets[r] == 1)) or "(none)"
            caption = (f'<b title="{escape(d.ids[r])}">{escape(d.ids[r])}</b>score {d.scores[r, g.cls]:.3f}'
                       f'<span class="labels" title="{escape(labels)}">true: {escape(labels)}</span>')
            figures.append(_thumb(a, r, out_dir, caption, kind))
        body = "".join(figures) or f'<span class="none">none at threshold {t:.3g}</span>'
        parts.append(f'<div class="strip"><div class="kind {kind}">{title}<small>{order}</small></div>'
                     f'<div class="thumbs">{body}</div></div>')
    return "<section>" + "".join(parts) + "</section>"


def _class_table(a: ErrorAnalysis) -> str:
    weak = {g.cls for g in a.worst}
    head = ('<tr><th data-col>rank</th><th class="name" data-col>class</th><th data-col>positives</th>'
            "<th data-col>AP</th><th data-col>F1</th><th data-col>precision</th><th data-col>recall</th>"
            "<th data-col>threshold</th><th data-col>false pos.</th><th data-col>false neg.</th></tr>")
    order = sorted(range(len(a.per_class)), key=lambda j: (a.per_class[j]["rank"] is None, a.per_class[j]["rank"] or 0))
    rows = []
    for j in order:
        r = a.per_class[j]
        rank = r["rank"]
        rows.append(f'<tr{" class=weak" if j in weak else ""}>' + _cell(rank, 0)
                    + f'<td class="name" title="{escape(r["class"])}">{escape(r["class"])}</td>'
                    + _cell(r["positives"], 0) + _cell(r["ap"]) + _cell(r["f1"]) + _cell(r["precision"])
                    + _cell(r["recall"]) + _cell(r["threshold"], 3) + _cell(r["fp"], 0) + _cell(r["fn"], 0) + "</tr>")
    return f'<div class="scroll"><table id="classes"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table></div>'


def _suspects(a: ErrorAnalysis, out_dir: Path, csv_path: Path | None) -> str:
    rows = suspect_rows(a)
    o = a.options
    intro = (f"<p>{len(rows)} labels the model contradicts with confidence: a positive label scored below "
             f"{o.suspect_below:g}, or a negative one above {o.suspect_above:g} — the short list to check by hand, "
             "most confident first.")
    if csv_path is not None:
        intro += f' All of them: <a href="{escape(quote(csv_path.name))}">{escape(csv_path.name)}</a>.'
    if len(rows) > SUSPECT_ROWS:
        intro += f" The first {SUSPECT_ROWS} are shown here."
    if not rows:
        return intro + "</p>"
    body = []
    for i, (row, (r, c)) in enumerate(zip(rows[:SUSPECT_ROWS], zip(*a.suspects))):
        rank, img_id, _, cls, label, score, contradiction = row
        href = _link(a.data.paths[r], out_dir)
        picture = f'<img src="{_data_url(a.thumbs[r])}" alt="">' if i < SUSPECTS_SHOWN and r in a.thumbs else ""
        if href:
            picture = f'<a href="{escape(href)}">{picture or "image"}</a>'
        body.append(f"<tr>{_cell(rank, 0)}<td>{picture}</td><td class='name'>{escape(img_id)}</td>"
                    f'<td class="name" title="{escape(cls)}">{escape(cls)}</td>{_cell(label, 0)}'
                    f"{_cell(float(score), 4)}{_cell(float(contradiction), 4)}</tr>")
    head = ("<tr><th data-col>rank</th><th>image</th><th class='name' data-col>img_id</th>"
            "<th class='name' data-col>class</th><th data-col>label</th><th data-col>score</th>"
            "<th data-col>contradiction</th></tr>")
    return intro + f'</p><div class="scroll"><table><thead>{head}</thead><tbody>{"".join(body)}</tbody></table></div>'


def _runs_table(runs: Sequence[Run]) -> str:
    head = ("<tr><th class=name>run</th><th class=name>arch</th><th class=name>loss</th><th>epochs</th>"
            "<th>best val mAP</th><th>best epoch</th><th>train time</th><th>eval img/s</th><th class=name>status</th></tr>")
    rows = [f"<tr><td class=name>{escape(r.label)}</td><td class=name>{escape(r.arch)}</td>"
            f"<td class=name>{escape(r.loss)}</td><td>{r.epochs_done}/{r.epochs}</td><td>{_num(r.best_val_map)}</td>"
            f"<td>{r.best_epoch}</td><td>{clock(r.train_seconds)}</td><td>{_num(r.eval_img_per_s, 1)}</td>"
            f"<td class=name>{escape(r.status)}</td></tr>" for r in runs]
    return f"<h3>runs</h3><table>{head}{''.join(rows)}</table>"


def _ensembles_table(ensembles: Sequence[EnsembleResult]) -> str:
    head = ("<tr><th class=name>ensemble / member</th><th>weight</th><th>val mAP</th><th>img/s</th>"
            "<th class=name>device</th></tr>")
    rows = []
    for e in ensembles:
        rows.append(f"<tr><td class=name><b>{escape(e.label)}</b></td><td>{escape(e.weighting)}</td>"
                    f"<td>{_num(e.val_map)}</td><td>{_num(e.img_per_s, 1)}</td>"
                    f"<td class=name>{escape(e.device)}, {escape(e.precision)}</td></tr>")
        rows += [f"<tr><td class=name>&nbsp;&nbsp;{escape(m.arch)} {m.img_size}px: {escape(m.path)}</td>"
                 f"<td>{m.weight:.3f}</td><td>{_num(m.val_map)}</td><td>{_num(m.img_per_s, 1)} (model only)</td>"
                 "<td></td></tr>" for m in e.members]
    return f"<h3>ensembles</h3><table>{head}{''.join(rows)}</table>"


def _facts(a: ErrorAnalysis, csv_path: Path | None) -> str:
    d = a.data
    scored = sum(r["rank"] is not None for r in a.per_class)
    f1 = _num(a.macro_f1)
    items = [("scored", escape(d.source)), ("images", f"{len(d.ids)}"),
             ("classes", f"{len(d.classes)} ({scored} with a positive label)"), ("macro mAP", _num(a.map)),
             ("macro F1", f"{f1} at threshold {escape(a.thresholds.source)}"),
             ("suspect labels", f"{len(a.suspects[0])}" + (f" ({escape(csv_path.name)})" if csv_path else ""))]
    if a.unreadable:
        items.append(("images not readable", f"{len(a.unreadable)} of {len(a.shown_rows())} shown"))
    return '<dl class="facts">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def write_report_html(path: Path, *, runs: Sequence[Run], ensembles: Sequence[EnsembleResult],
                      pictures: dict[str, Path], analysis: ErrorAnalysis | None, suspects_csv: Path | None,
                      notes: Sequence[str]) -> Path:
    """Write report.html into `path`'s folder, atomically (see the module docstring)."""
    out_dir = path.parent
    what = (analysis.data.source if analysis is not None else
            runs[0].label if len(runs) == 1 else f"{len(runs)} runs" if runs else "ensembles")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections, nav = [], []

    def section(anchor: str, title: str, body: str) -> None:
        nav.append(f'<a href="#{anchor}">{title}</a>')
        sections.append(f'<section id="{anchor}"><h2>{title}</h2>{body}</section>')

    summary = _facts(analysis, suspects_csv) if analysis is not None else ""
    summary += (_runs_table(runs) if runs else "") + (_ensembles_table(ensembles) if ensembles else "")
    if notes:
        summary += '<ul class="notes">' + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>"
    section("summary", "summary", summary)
    figures = []
    for key, title in PICTURE_TITLES.items():
        if key in pictures and pictures[key].is_file():
            name = pictures[key].name
            figures.append(f'<figure class="pic"><img src="{_data_url(pictures[key].read_bytes())}" '
                           f'alt="{escape(title)}"><figcaption>{escape(title)} · '
                           f'<a href="{escape(quote(name))}">{escape(name)}</a></figcaption></figure>')
    if figures:
        section("pictures", "pictures", "".join(figures))
    if analysis is not None:
        section("classes", "per class", "<p>Click a column to sort; the rows of the gallery's classes are red.</p>"
                + _class_table(analysis))
        galleries = "".join(_gallery(analysis, g, out_dir) for g in analysis.worst + analysis.requested)
        files = [p.name for k, p in pictures.items() if k == "errors" or k.startswith("errors_")]
        links = ", ".join(f'<a href="{escape(quote(n))}">{escape(n)}</a>' for n in files)
        section("errors", "errors of the worst classes",
                f"<p>Each thumbnail links to its image. As pictures: {links or '–'}.</p>"
                + (galleries or '<p class="none">no class has a positive label</p>'))
        section("suspects", "suspect labels", _suspects(analysis, out_dir, suspects_csv))
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{PAGE_MARK}'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>aicoss report: {escape(what)}</title><style>{STYLE}</style></head><body>"
            f"<header><h1>aicoss report</h1><p>{escape(what)} · written {stamp}</p></header>"
            f"<nav>{''.join(nav)}</nav><main>{''.join(sections)}</main><script>{SCRIPT}</script></body></html>\n")
    write_text_atomic(path, page)
    return path
