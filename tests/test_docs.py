"""The documentation holds together: every relative link and `#anchor` in README.md,
CONTRIBUTING.md and docs/*.md resolves, README.md stays a front page, every command and every docs
page is reachable from it, and the recipe key tables of docs/recipes.md are the recipe schema's.

External http(s) links are not fetched. Anchors follow GitHub's heading slugs: the heading's text
(code spans and link texts kept, markup dropped), lowercased, punctuation removed except `-` and
`_`, spaces turned into `-`; a repeated slug gets `-1`, `-2`, ...

`python tests/test_docs.py` prints the recipe key tables, to paste into docs/recipes.md.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import ROOT  # noqa: E402  (also when run as a script)

PAGES = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", *(ROOT / "docs").glob("*.md")])
README_MAX_LINES = 250

_FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
_INLINE_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^()\s>]*(?:\([^()\s]*\)[^()\s>]*)*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def _prose(text: str) -> str:
    """The text a reader sees as prose: fenced code blocks and HTML comments blanked (line count kept)."""
    blank = lambda m: "\n" * m.group(0).count("\n")  # noqa: E731
    return _FENCE.sub(blank, _COMMENT.sub(blank, text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading's text (without the repeat suffix)."""
    text = _CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text).replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor the headings of a markdown page define."""
    seen: dict[str, int] = {}
    found = set()
    for match in _HEADING.finditer(_prose(page.read_text(encoding="utf-8"))):
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[tuple[int, str]]:
    """(line, target) of every inline link, image and reference definition outside code."""
    text = _prose(page.read_text(encoding="utf-8"))
    text = _CODE_SPAN.sub(lambda m: " " * len(m.group(0)), text)
    out = []
    for pattern, group in ((_INLINE_LINK, 2), (_REF_DEF, 1)):
        for match in pattern.finditer(text):
            out.append((text.count("\n", 0, match.start()) + 1, match.group(group)))
    return out


def broken_links(page: Path) -> list[str]:
    """What does not resolve in `page`, one line each: `file:line: target (why)`."""
    problems = []
    for line, target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http(s), mailto: not fetched
            continue
        path, _, anchor = target.partition("#")
        where = f"{page.relative_to(ROOT)}:{line}: {target}"
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"{where} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where} (no heading with that anchor in {dest.relative_to(ROOT)})")
        elif anchor and dest.suffix != ".md":
            problems.append(f"{where} (an anchor into a file that is not markdown)")
    return problems


# --------------------------------------------------------------------------- the checks


def test_the_pages_exist():
    assert (ROOT / "CONTRIBUTING.md").is_file() and (ROOT / "docs" / "index.md").is_file()
    assert len(PAGES) > 10


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_anchor_resolves(page):
    assert links(page), f"{page.name} links nowhere"
    problems = broken_links(page)
    assert not problems, "\n".join(problems)


def test_a_broken_link_or_anchor_is_found(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "a.md").write_text("# A page\n\n## Same\n\n## Same\n\n```bash\n# not a heading\n```\n", encoding="utf-8")
    page = tmp_path / "b.md"
    page.write_text(
        "# B: `code` and [a link](a.md)\n\n"
        "[ok](a.md#same-1) [ok](#b-code-and-a-link) [ok](https://example.invalid/x) `[not a link](nowhere.md)`\n"
        "[gone](missing.md) [bad anchor](a.md#not-a-heading) [third same](a.md#same-2)\n"
        "<!-- [commented out](todo.md) -->\n"
        "```md\n[in code](nowhere.md)\n```\n", encoding="utf-8")
    assert anchors(tmp_path / "a.md") == {"a-page", "same", "same-1"}
    assert broken_links(page) == ["b.md:4: missing.md (no such file)",
                                  "b.md:4: a.md#not-a-heading (no heading with that anchor in a.md)",
                                  "b.md:4: a.md#same-2 (no heading with that anchor in a.md)"]


def test_slugs_follow_github():
    assert slug("Faithful to the seed, and where it was not") == "faithful-to-the-seed-and-where-it-was-not"
    assert slug("`[runtime]` keys") == "runtime-keys"
    assert slug("count-params, import-weights, prior") == "count-params-import-weights-prior"
    assert slug("Many GPUs (torchrun)") == "many-gpus-torchrun"
    assert slug("predict_fp16 ≤ 250 lines") == "predict_fp16--250-lines"


def test_the_readme_is_a_front_page_with_the_two_quick_start_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES, len(text.splitlines())
    assert "make demo" in text and "make test" in text


def test_the_readme_lists_every_command_with_a_link():
    from aicoss_cli.cli.app import COMMANDS

    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(?:aicoss )?([a-z0-9-]+)(?: [a-z0-9-]+)*`[^|]*\|.*?\]\(([^)]+)\)",
                                                        (ROOT / "README.md").read_text(encoding="utf-8"), re.M)}
    missing = [name for name, _ in COMMANDS if name not in rows]
    assert not missing, f"commands without a row (and a link) in README.md's command table: {missing}"


def test_every_docs_page_is_in_the_index_and_the_readme():
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"index.md"}
    for index in (ROOT / "docs" / "index.md", ROOT / "README.md"):
        linked = {Path(target.partition("#")[0]).name for _, target in links(index)}
        assert pages <= linked, f"{index.name} does not link {sorted(pages - linked)}"


# --------------------------------------------------------------------------- the recipe key tables


def _accepts(annotation, metadata=()) -> str:
    """What a recipe key accepts, from its type and its pydantic constraints."""
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _accepts(args[0], (*metadata, *annotation.__metadata__))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_accepts(a, metadata) for a in args if a is not type(None))
    if origin is typing.Literal:
        return " \\| ".join(f'`"{a}"`' for a in args)
    if origin is list:
        return f"a list of {_accepts(args[0])}"
    limits = []
    for item in metadata:
        for attr, sign in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
            value = getattr(item, attr, None)
            if value is not None:
                limits.append(f"{sign} {value:g}" if value < 2**31 else f"{sign} 2^{value.bit_length() - 1}")
    kind = {bool: "`true` \\| `false`", int: "integer", float: "number", str: "string"}[annotation]
    return " ".join([kind, ", ".join(limits)]).strip()


def _default(field) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value!r}`".replace("'", '"')


# keys whose validator accepts less than their type says
NARROWED = {("top level", "name"): "string of letters, digits, `_.+-` (≤ 120 characters)",
            ("[model]", "pretrained"): "`true` \\| `false` \\| a weights file path",
            ("[loss]", "name"): "a loss name or alias",
            ("[loss]", "prior"): '`false` \\| `"labels"` \\| `"predictions"` \\| a prior CSV path',
            ("[runtime]", "device"): '`"auto"` \\| `"cpu"` \\| `"cuda"` \\| `"cuda:N"`'}


def _loss_defaults(key: str) -> str:
    """The losses taking a [loss] parameter, each with its own default."""
    from aicoss_cli.losses.registry import LOSS_CLASSES, loss_param_defaults

    shown = []
    for name in LOSS_CLASSES:
        defaults = loss_param_defaults(name)
        if key in defaults:
            value = defaults[key]
            shown.append(name if value is None else f'{name} ({value:g})' if isinstance(value, (int, float))
                         else f'{name} ("{value}")')
    return ", ".join(shown) or "all"


def recipe_key_tables() -> str:
    """One markdown table per recipe section, made from the pydantic models (`aicoss_cli.recipe`): key,
    default, what it accepts, and its description; [loss] parameters also name the losses taking them
    and each one's default (the recipe leaves them unset: the chosen loss's own default applies)."""
    from aicoss_cli.losses.registry import loss_param_fields
    from aicoss_cli.recipe import ALL_SECTIONS, Recipe, section_model

    loss_fields = loss_param_fields()
    tables = []
    groups = [("top level", {k: f for k, f in Recipe.model_fields.items() if k not in ALL_SECTIONS})]
    groups += [(f"[{s}]", section_model(s).model_fields) for s in ALL_SECTIONS]
    for title, fields in groups:
        loss = title == "[loss]"
        head = "| key | default | accepts | meaning |" + (" losses (their default) |" if loss else "")
        rows = [f"### `{title}`" if title != "top level" else "### Top level", "", head,
                "|---|---|---|---|" + ("---|" if loss else "")]
        for key, field in fields.items():
            source = loss_fields.get(key, field) if loss else field
            accepts = NARROWED.get((title, key)) or _accepts(source.annotation, source.metadata)
            meaning = (field.description or "").replace("|", "\\|")
            row = f"| `{key}` | {_default(field)} | {accepts} | {meaning} |"
            if loss:
                row += f" {_loss_defaults(key)} |"
            rows.append(row)
        tables.append("\n".join(rows))
    return "\n\n".join(tables) + "\n"


def test_the_recipe_key_tables_are_the_schema():
    text = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    tables = recipe_key_tables()
    assert tables in text, ("docs/recipes.md's key tables differ from the recipe schema; regenerate them with "
                            "`python tests/test_docs.py`")



def test_contributing_s_module_map_names_every_module():
    """CONTRIBUTING.md's table names each package's every module (a new module gets its line)."""
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)/` \| (.*) \|$",
                                                        (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8"), re.M)}
    packages = sorted(p for p in (ROOT / "aicoss_cli").iterdir() if (p / "__init__.py").is_file())
    assert sorted(rows) == [p.name for p in packages]
    missing = [f"{p.name}/{m.stem}" for p in packages for m in sorted(p.glob("*.py"))
               if m.stem != "__init__" and f"`{m.stem}`" not in rows[p.name]]
    assert not missing, f"modules the module map in CONTRIBUTING.md does not name: {missing}"

if __name__ == "__main__":
    print(recipe_key_tables(), end="")
