"""The error analysis's pictures: errors.png (false positives and false negatives as thumbnails),
pr_curves.png (precision–recall of the worst and best classes) and cooccurrence.png (the true
labels of each class's false positives).

The curves and the matrix are drawn like the other report pictures (`pictures`: a bare matplotlib
Figure). The gallery is laid out in pixels and drawn with PIL in matplotlib's font: as a
matplotlib figure its hundreds of thumbnails and captions took many seconds. Every picture holds
the PNG text chunk that marks a report's picture. Every user string (class names, ids) is cut or
wrapped to the pixels it has, with an ellipsis.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np

from aicoss_cli.base.files import atomic_path
from aicoss_cli.evaluation.metrics import precision_recall_curve
from aicoss_cli.results.errors import THUMB, ClassErrors, ErrorAnalysis, read_thumbnails
from aicoss_cli.results.pictures import PNG_KEY, new_figure, plain_text, save_png

CURVES_PER_PANEL = 5
MATRIX_ROWS = 25
MATRIX_COLS = 25

# the gallery's layout, in pixels
LEFT, CELL, RIGHT = 150, THUMB + 24, 16
TITLE_H, HEADER_H, CAPTION_H, LINE_GAP, EMPTY_H, BLOCK_GAP = 60, 44, 56, 8, 28, 18
FP_COLOUR, FN_COLOUR, GREY, INK = (214, 39, 40), (31, 119, 180), (90, 90, 90), (20, 20, 20)


def draw_error_analysis(analysis: ErrorAnalysis, targets: dict[str, Path]) -> dict[str, Path]:
    """Read the thumbnails, then draw errors.png, one errors_<class>.png per --classes class,
    pr_curves.png and cooccurrence.png into their `targets` (keys of `errors.error_files`)."""
    read_thumbnails(analysis)
    d = analysis.data
    title = f"errors on {d.source}: the {len(analysis.worst)} worst classes by AP"
    pictures = {"errors": draw_gallery(analysis, analysis.worst, targets["errors"], title)}
    for g in analysis.requested:
        key = f"errors_{g.cls}"
        pictures[key] = draw_gallery(analysis, [g], targets[key], f"errors of {d.classes[g.cls]} on {d.source}")
    pictures["pr_curves"] = draw_pr_curves(analysis, targets["pr_curves"])
    pictures["cooccurrence"] = draw_cooccurrence(analysis, targets["cooccurrence"])
    return pictures


class _Pen:
    """Text on a PIL image in matplotlib's own font (DejaVu Sans), cut or wrapped to a width in
    pixels with an ellipsis."""

    def __init__(self, image):
        from matplotlib import font_manager
        from PIL import ImageDraw, ImageFont

        regular = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"))
        bold = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans", weight="bold"))
        self.draw = ImageDraw.Draw(image)
        self.font = {(size, b): ImageFont.truetype(bold if b else regular, size)
                     for size in (10, 11, 12, 14, 17) for b in (False, True)}

    def fit(self, text: str, size: int, width: float, bold: bool = False) -> str:
        font = self.font[size, bold]
        if font.getlength(text) <= width:
            return text
        lo, hi = 0, len(text)  # the longest prefix that fits with its ellipsis
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if font.getlength(text[:mid] + "…") <= width else (lo, mid - 1)
        return text[:lo] + "…"

    def wrap(self, text: str, size: int, width: float, lines: int) -> list[str]:
        """Greedy word wrap in at most `lines` lines; a word longer than a line is cut."""
        font, out, line = self.font[size, False], [], ""
        for word in text.split(" "):
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width or not line:
                line = candidate
            else:
                out.append(line)
                line = word
        out.append(line)
        cut = [self.fit(x, size, width) for x in out[:lines]]
        if len(out) > lines:  # the last line shown goes on: it ends in an ellipsis
            cut[-1] = self.fit(f"{out[lines - 1]} {out[lines]}", size, width)
        return cut

    def text(self, x: float, y: float, text: str, size: int, colour=INK, bold: bool = False, width: float | None = None,
             lines: int = 1, anchor: str = "la") -> None:
        """`text` at (x, y), cut to `width` pixels, or wrapped in up to `lines` lines of it."""
        shown = [text] if width is None else [self.fit(text, size, width, bold)] if lines == 1 \
            else self.wrap(text, size, width, lines)
        for i, line in enumerate(shown):
            self.draw.text((x, y + round(1.2 * size) * i), line, font=self.font[size, bold], fill=colour, anchor=anchor)

    def thumbnail(self, image, thumb: np.ndarray | None, x: int, y: int, frame: tuple[int, int, int]) -> None:
        """A thumbnail (or a grey box saying it is missing) at (x, y) in a 3-pixel frame."""
        from PIL import Image

        self.draw.rectangle((x - 3, y - 3, x + THUMB + 2, y + THUMB + 2), fill=frame)
        if thumb is None:
            self.draw.rectangle((x, y, x + THUMB - 1, y + THUMB - 1), fill=(225, 225, 225))
            self.text(x + THUMB / 2, y + THUMB / 2, "not readable", 10, GREY, anchor="mm")
        else:
            image.paste(Image.fromarray(np.ascontiguousarray(thumb[:THUMB, :THUMB])), (x, y))


def _kind_lines(rows: Sequence[int], per_row: int) -> int:
    return max(1, math.ceil(len(rows) / per_row)) if rows else 0


def _block_height(g: ClassErrors, per_row: int) -> int:
    height = HEADER_H + BLOCK_GAP
    for rows in (g.fp, g.fn):
        lines = _kind_lines(rows, per_row)
        height += lines * (THUMB + CAPTION_H + LINE_GAP) if lines else EMPTY_H
    return height


def draw_gallery(analysis: ErrorAnalysis, blocks: Sequence[ClassErrors], out_png: str | Path, title: str) -> Path:
    """errors.png: per class, a row of its false positives (label 0, highest scores first) and a row
    of its false negatives (label 1, lowest scores first), each thumbnail with its img_id, score
    and true labels. An image that could not be read is a grey box saying so."""
    from PIL import Image

    d, t, per_row = analysis.data, analysis.thresholds.values, analysis.options.per_row
    width = max(800, LEFT + per_row * CELL + RIGHT)
    height = TITLE_H + sum(_block_height(g, per_row) for g in blocks) + (0 if blocks else EMPTY_H)
    image = Image.new("RGB", (width, height), "white")
    pen = _Pen(image)
    pen.text(12, 10, title, 17, bold=True, width=width - 24)
    pen.text(12, 36, f"red frame: false positive (label 0, score ≥ threshold) · blue frame: false negative (label 1, "
                     f"score < threshold) · threshold {analysis.thresholds.source}", 11, GREY, width=width - 24)
    y = TITLE_H
    if not blocks:
        pen.text(12, y, "no class has a positive label: there is no error to show", 12, GREY)
    for g in blocks:
        row = analysis.per_class[g.cls]
        pen.text(12, y + 4, d.classes[g.cls], 14, bold=True, width=width - 24)
        pen.text(12, y + 24, f"AP {row['ap']:.3f} · {row['positives']} positives · {g.n_fp} false positives, "
                             f"{g.n_fn} false negatives at threshold {t[g.cls]:.3g}", 11, GREY, width=width - 24)
        y += HEADER_H
        for rows, kind, colour, order in ((g.fp, "false positives", FP_COLOUR, "label 0, highest scores"),
                                          (g.fn, "false negatives", FN_COLOUR, "label 1, lowest scores")):
            pen.text(12, y + 2, kind, 12, colour, bold=True)
            if not rows:
                pen.text(LEFT, y + 3, f"none at threshold {t[g.cls]:.3g}", 11, GREY)
                y += EMPTY_H
                continue
            pen.text(12, y + 20, order, 10, GREY)
            for i, r in enumerate(rows):
                line, col = divmod(i, per_row)
                x0, y0 = LEFT + col * CELL, y + line * (THUMB + CAPTION_H + LINE_GAP)
                pen.thumbnail(image, analysis.thumbs.get(r), x0, y0, colour)
                labels = ", ".join(d.classes[k] for k in np.flatnonzero(d.targets[r] == 1)) or "(none)"
                pen.text(x0, y0 + THUMB + 4, d.ids[r], 11, bold=True, width=CELL - 6)
                pen.text(x0, y0 + THUMB + 17, f"score {d.scores[r, g.cls]:.3f}", 11)
                pen.text(x0, y0 + THUMB + 30, f"true: {labels}", 11, width=CELL - 6, lines=2)
            y += _kind_lines(rows, per_row) * (THUMB + CAPTION_H + LINE_GAP)
        y += BLOCK_GAP
    return _save_image(image, out_png)


def _save_image(image, out_png: str | Path) -> Path:
    """A PIL image as a report picture: PNG with the text chunk `is_report_picture` looks for."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PNG_KEY, "1")
    with atomic_path(out_png) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(out_png)


def draw_pr_curves(analysis: ErrorAnalysis, out_png: str | Path) -> Path:
    """pr_curves.png: precision against recall of the worst and of the best classes by AP (one
    panel when there are few), each class's decision threshold marked (●)."""
    d = analysis.data
    ranked = sorted((j for j, r in enumerate(analysis.per_class) if r["rank"] is not None),
                    key=lambda j: analysis.per_class[j]["rank"])
    if len(ranked) <= CURVES_PER_PANEL:
        panels = [("every class" if len(ranked) != 1 else "the class", ranked)]
    else:
        k = min(CURVES_PER_PANEL, math.ceil(len(ranked) / 2))
        best = min(CURVES_PER_PANEL, len(ranked) - k)
        panels = [(f"the {k} worst classes by AP", ranked[:k]), (f"the {best} best classes by AP", ranked[::-1][:best])]
    width = 9 if len(panels) == 1 else 15
    fig = new_figure(width, 6)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    marked = f"decision threshold ({plain_text(analysis.thresholds.source, 40)})"
    for ax, (title, classes) in zip(axes, panels):
        for i, j in enumerate(classes):
            keep = d.targets[:, j] != -1
            precision, recall, _ = precision_recall_curve(d.targets[keep, j] == 1, d.scores[keep, j])
            row = analysis.per_class[j]
            ax.step(np.r_[0.0, recall], np.r_[precision[0], precision], where="pre", color=f"C{i}",
                    label=f"{plain_text(d.classes[j], 32)} (AP {row['ap']:.3f})")
            if row["precision"] > 0 or row["recall"] > 0:
                ax.scatter([row["recall"]], [row["precision"]], color=f"C{i}", edgecolors="black", s=45, zorder=3)
        ax.scatter([], [], color="white", edgecolors="black", s=45, label=marked)
        ax.set_xlim(0, 1.01)
        ax.set_ylim(0, 1.03)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize="small")
        if not classes:
            ax.text(0.5, 0.5, "no class has a positive label", ha="center", va="center", transform=ax.transAxes)
    title = f"precision–recall on {d.source} ({len(d.ids)} images; mAP {analysis.map:.4f})"
    fig.suptitle(textwrap.fill(plain_text(title, 400), width * 12))
    return save_png(fig, out_png)


def draw_cooccurrence(analysis: ErrorAnalysis, out_png: str | Path) -> Path:
    """cooccurrence.png: rows are the classes with the most false positives, columns the true
    labels of those images (the labels seen most, and "(no label)"): cell = how many of the row's
    false positives carry that label, coloured by its share of the row."""
    d = analysis.data
    fp = np.array([r["fp"] for r in analysis.per_class])
    rows = [int(j) for j in np.argsort(-fp, kind="stable") if fp[j] > 0][:MATRIX_ROWS]
    totals = analysis.pairs[rows].sum(axis=0) if rows else np.zeros(len(d.classes))
    cols = [int(i) for i in np.argsort(-totals, kind="stable") if totals[i] > 0][:MATRIX_COLS]
    counts = np.column_stack([analysis.pairs[np.ix_(rows, cols)], analysis.alone[rows]]) if rows else np.zeros((0, 1))
    width = max(9.0, 4.5 + 0.42 * (len(cols) + 1))
    fig = new_figure(width, max(4.5, 2.8 + 0.34 * len(rows)) if rows else 3.0)
    ax = fig.subplots()
    with_fp = int((fp > 0).sum())
    if not rows:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no false positive at these thresholds", ha="center", va="center", transform=ax.transAxes)
    else:
        share = counts / fp[rows][:, None]
        image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        for (r, c), n in np.ndenumerate(counts):
            if n:
                ax.text(c, r, str(n), ha="center", va="center", fontsize=7, color="white" if share[r, c] > 0.6 else "black")
            elif c < len(cols) and cols[c] == rows[r]:  # a class is never its own false positive's label
                ax.text(c, r, "–", ha="center", va="center", fontsize=7, color="0.6")
        ax.set_yticks(range(len(rows)), [f"{plain_text(d.classes[j], 30)} ({fp[j]})" for j in rows], fontsize=8)
        ax.set_xticks(range(len(cols) + 1), [plain_text(d.classes[i], 24) for i in cols] + ["(no label)"], fontsize=8,
                      rotation=55, ha="right", rotation_mode="anchor")
        ax.set_ylabel("false positives of the class (how many)")
        ax.set_xlabel("true labels of those images")
        fig.colorbar(image, ax=ax, label="share of the row's false positives", shrink=0.8)
    more = f"; the {len(rows)} of {with_fp} with the most" if with_fp > len(rows) else ""
    title = (f"what the false positives really are, on {d.source} — rows: the classes with false positives{more}; "
             "columns: the true labels of those images")
    fig.suptitle(textwrap.fill(plain_text(title, 400), int(width * 12)), fontsize=10)
    return save_png(fig, out_png)
