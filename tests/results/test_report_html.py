"""report.html: it parses, holds every class, escapes every user string, links each thumbnail to
its image by a relative path, and needs nothing from the network."""

from __future__ import annotations

import os
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

HOSTILE = '<script>alert("x")</script> & \'q\' 🌧'


class Page(HTMLParser):
    """What a browser would see: tags with their attributes, the text of each table cell."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.rows: dict[str | None, list[list[str]]] = {}
        self.table: list[str | None] = []
        self.cell: list[str] | None = None
        self.script = ""
        self.in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "table":
            self.table.append(attrs.get("id"))
        elif tag == "tr" and self.table:
            self.rows.setdefault(self.table[-1], []).append([])
        elif tag in ("td", "th"):
            self.cell = []
        elif tag == "script":
            self.in_script = True

    def handle_endtag(self, tag):
        if tag == "table":
            self.table.pop()
        elif tag in ("td", "th") and self.cell is not None:
            self.rows[self.table[-1]][-1].append("".join(self.cell).strip())
            self.cell = None
        elif tag == "script":
            self.in_script = False

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)
        if self.in_script:
            self.script += data


def _analysis(tmp_path: Path, classes: list[str]):
    from aicoss_cli.results.errors import ErrorOptions, LabeledScores, analyse

    rng = np.random.default_rng(0)
    n, k = 60, len(classes)
    y = (rng.random((n, k)) < 0.3).astype(np.int8)
    s = np.clip(0.3 * y + 0.7 * rng.random((n, k)), 0, 1)
    s[0, 0], y[0, 0] = 0.999, 0  # a suspect
    images = tmp_path / "data" / "train"
    paths = [str(images / f"img {i} #&.jpg") for i in range(n)]
    ids = [HOSTILE if i == 0 else f"id{i}" for i in range(n)]
    a = analyse(LabeledScores("scores & <labels>", ids, classes, s, y, paths), ErrorOptions(worst=3))
    for row in a.shown_rows():
        a.thumbs[row] = np.full((96, 96, 3), row % 255, dtype=np.uint8)
    return a


def _write(tmp_path, analysis):
    from aicoss_cli.results.html import write_report_html

    out = tmp_path / "report"
    out.mkdir(exist_ok=True)
    return write_report_html(out / "report.html", runs=[], ensembles=[], pictures={}, analysis=analysis,
                             suspects_csv=out / "suspect_labels.csv", notes=[f"note about {HOSTILE}"])


def test_the_page_parses_holds_every_class_and_escapes_what_users_wrote(tmp_path):
    classes = [HOSTILE, 'say "hi"', "a,b", "$x$"] + [f"class {j}" for j in range(40)]
    a = _analysis(tmp_path, classes)
    path = _write(tmp_path, a)
    text = path.read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    page.close()

    names = [row[1] for row in page.rows["classes"][1:]]
    assert sorted(names) == sorted(classes)  # every class once, its name as written
    assert "<script>alert" not in text and text.count("<script>") == 1
    assert [t for t, _ in page.tags].count("script") == 1
    assert HOSTILE in [row[2] for row in page.rows[None] if len(row) > 2]  # the suspect's img_id, as text
    # weakest first: the table starts in rank order
    ranks = [row[0] for row in page.rows["classes"][1:]]
    assert ranks[:3] == ["1", "2", "3"]


def test_thumbnails_link_their_images_by_relative_paths_and_nothing_comes_from_the_network(tmp_path):
    from urllib.parse import unquote

    a = _analysis(tmp_path, [f"c{j}" for j in range(5)])
    path = _write(tmp_path, a)
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    links = [attrs["href"] for tag, attrs in page.tags if tag == "a" and "href" in attrs]
    images = [unquote(h) for h in links if h.endswith(".jpg")]
    expected = {os.path.relpath(a.data.paths[r], path.parent) for r in a.shown_rows()}
    assert images and set(images) == expected
    assert all(h.startswith("../data/train/img ") for h in images)
    for tag, attrs in page.tags:
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            assert not value.startswith(("http:", "https:", "//")), (tag, attrs)
        if tag == "img":
            assert attrs["src"].startswith("data:image/")
        assert tag != "link"  # no stylesheet from anywhere


def test_only_a_page_this_report_wrote_is_taken_for_its_own(tmp_path):
    from aicoss_cli.results.html import is_report_page

    path = _write(tmp_path, _analysis(tmp_path, ["a", "b"]))
    mine = tmp_path / "mine.html"
    mine.write_text("<html><body>my notes</body></html>")
    assert is_report_page(path) and not is_report_page(mine) and not is_report_page(tmp_path / "absent.html")
