"""The shipped benchmark text (benchmarks/data/eval.txt, calib.txt) and its wikitext cleaner.

Fast and offline: reads the committed files and runs the cleaner on hand-written snippets.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent.parent / "benchmarks" / "data"
FILES = ("eval.txt", "calib.txt")
# (min, max) characters: targets are 120,000 and 250,000
SIZE_BOUNDS = {"eval.txt": (110_000, 125_000), "calib.txt": (235_000, 255_000)}


def _load_make_text():
    spec = importlib.util.spec_from_file_location("bench_data_make_text", DATA / "make_text.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mt = _load_make_text()


def _text(name: str) -> str:
    return (DATA / name).read_bytes().decode("utf-8")   # strict: fails on invalid UTF-8


def _readme_titles(name: str) -> list:
    """Titles listed under '### Articles in <name>' in the README, in order."""
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    m = re.search(rf"^### Articles in {re.escape(name)}\n(.*?)(?=^#|\Z)", readme, re.MULTILINE | re.DOTALL)
    assert m, f"README has no article list for {name}"
    return [line[2:].strip() for line in m.group(1).splitlines() if line.startswith("- ")]


def _readme_sha256(name: str) -> str:
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    m = re.search(rf"^\| `{re.escape(name)}` \|.*`([0-9a-f]{{64}})` \|$", readme, re.MULTILINE)
    assert m, f"README has no sha256 row for {name}"
    return m.group(1)


# --------------------------------------------------------------------------------------------
# the shipped files
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FILES)
def test_file_exists_utf8_lf_and_sized(name):
    raw = (DATA / name).read_bytes()
    text = raw.decode("utf-8")
    lo, hi = SIZE_BOUNDS[name]
    assert lo <= len(text) <= hi
    assert b"\r" not in raw and b"\t" not in raw
    assert text.endswith("\n") and not text.endswith("\n\n")
    assert "\n\n\n" not in text            # one blank line between blocks, never more
    assert not text.startswith(("\n", " "))
    assert all(line == line.strip() for line in text.split("\n"))
    assert len(text.split()) > len(text) / 8   # words, not one huge token


@pytest.mark.parametrize("name", FILES)
def test_sha256_matches_readme(name):
    assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == _readme_sha256(name)


@pytest.mark.parametrize("name", FILES)
def test_few_markup_leftovers(name):
    text = _text(name)
    for token in ("{{", "}}", "[[", "]]", "{|", "|}", "|", "<ref", "</", "/>", "&nbsp;", "&amp;",
                  "&lt;", "&gt;", "&quot;", "http://", "https://", "thumb|", "px|", "\x00", "\x01",
                  "__NOTOC__", "'''", "''"):
        assert text.count(token) == 0, (token, text.count(token))
    # "<" and ">" occur in prose ("nickel is found at the <10 ppm level", "n > 3") only
    assert text.count("<") <= 2 and text.count(">") <= 2
    assert not re.search(r"<[a-zA-Z/!]", text)          # no HTML tag or comment
    assert not re.search(r"^[*#:;=!]", text, re.MULTILINE)      # no list/indent/heading/table markers
    assert not re.search(r"\(\s*[,;]|\(\s*\)", text)    # no "(, " or "()" left by removed templates
    assert not re.search(r" [,.;:]", text)


@pytest.mark.parametrize("name", FILES)
def test_mostly_ascii_english(name):
    text = _text(name)
    ascii_share = sum(c.isascii() for c in text) / len(text)
    assert ascii_share > 0.98
    letters = sum(c.isalpha() or c.isspace() for c in text) / len(text)
    assert letters > 0.9
    words = re.findall(r"[a-z]+", text.lower())
    common = {"the", "of", "and", "in", "to", "a", "is", "was", "as", "by"}
    assert sum(w in common for w in words) / len(words) > 0.15   # English function words


def _articles(name: str) -> dict:
    """{title: body} for a file, split at the README's titles (which must appear in order)."""
    text = _text(name)
    titles = _readme_titles(name)
    assert text.startswith(titles[0] + "\n\n")
    starts = [0]
    for title in titles[1:]:   # each title starts a block after the previous article's start
        nxt = text.find(f"\n\n{title}\n\n", starts[-1] + 1)
        assert nxt > starts[-1], title
        starts.append(nxt + 2)
    ends = [s - 2 for s in starts[1:]] + [len(text) - 1]
    return {t: text[s + len(t) + 2:e] for t, s, e in zip(titles, starts, ends)}


@pytest.mark.parametrize("name", FILES)
def test_articles_start_with_their_titles(name):
    titles = _readme_titles(name)
    assert len(titles) >= 10 and len(set(titles)) == len(titles)
    arts = _articles(name)
    assert list(arts) == titles
    for title, body in arts.items():
        assert len(body) >= 1_000, title
        assert not body.startswith("\n") and not body.endswith("\n"), title


def test_eval_and_calib_disjoint():
    eval_titles, calib_titles = set(_readme_titles("eval.txt")), set(_readme_titles("calib.txt"))
    assert not eval_titles & calib_titles
    ev, ca = _text("eval.txt"), _text("calib.txt")
    eval_lines = {line for line in ev.split("\n") if len(line) >= 40}
    calib_lines = {line for line in ca.split("\n") if len(line) >= 40}
    assert len(eval_lines) > 100 and len(calib_lines) > 200
    assert not eval_lines & calib_lines
    # no article's opening paragraph is anywhere in the other file
    for name, other in (("eval.txt", ca), ("calib.txt", ev)):
        for title, body in _articles(name).items():
            assert body.split("\n", 1)[0][:200] not in other, title


# --------------------------------------------------------------------------------------------
# the cleaner
# --------------------------------------------------------------------------------------------

def test_clean_links_quotes_refs_and_inline_templates():
    wikitext = ("'''Foo''' is a [[bar|green fruit]] grown in [[Spain]] and ''Italy''."
                "<ref name=\"a\">{{cite web|url=http://x.org|title=T}}</ref> It "
                "{{citation needed|date=May 2010}}ripens within {{convert|20|km|mi}} of the coast."
                "<ref name=b/>")
    assert mt.clean_wikitext(wikitext) == (
        "Foo is a green fruit grown in Spain and Italy. It ripens within 20 km of the coast.")


def test_clean_drops_boxes_files_tables_and_boilerplate_sections():
    wikitext = (
        "{{Infobox fruit\n"
        "| name = Foo\n"
        "| image = {{nowrap|[[File:Foo.jpg|200px]]}}\n"
        "}}\n"
        "[[File:Foo tree.jpg|thumb|A foo tree in [[Madrid]], with [[fruit]]s]]\n"
        "The foo is eaten&nbsp;raw &amp; cooked. <!-- hidden note -->Farmers sell it at "
        "[http://market.example.com the local market] and [http://x.example.com] online.\n"
        "\n"
        "{| class=\"wikitable\"\n"
        "|-\n"
        "! Year !! Tonnes\n"
        "|-\n"
        "| 2001 || 5\n"
        "|}\n"
        "\n"
        "== History ==\n"
        "The foo was first grown in the 12th century by monks who kept detailed records.\n"
        "\n"
        "== See also ==\n"
        "* [[Bar]]\n"
        "\n"
        "== References ==\n"
        "{{reflist}}\n"
        "\n"
        "[[Category:Fruits]]\n"
        "[[de:Foo]]"
    )
    assert mt.clean_wikitext(wikitext) == (
        "The foo is eaten raw & cooked. Farmers sell it at the local market and online.\n\n"
        "History\n\n"
        "The foo was first grown in the 12th century by monks who kept detailed records.")


def test_clean_lists_formulas_and_html():
    wikitext = (
        "Crops grown in the valley include:\n"
        "* [[Apple]]\n"
        "* [[Pear]], [[Plum]]\n"
        "* Grapes, which are pressed for wine in most of the valleys of the region.\n"
        "\n"
        "The mean is <math>\\bar x</math>, the sum divided by the count.\n"
        "\n"
        "The area is large.<br/>It is <small>very</small> hot in summer and dry."
    )
    assert mt.clean_wikitext(wikitext) == (
        "Crops grown in the valley include:\n\n"
        "Grapes, which are pressed for wine in most of the valleys of the region.\n\n"
        "The area is large. It is very hot in summer and dry.")


def test_clean_nested_templates_and_empty_sections():
    wikitext = ("{{multiple issues|\n{{refimprove|date=March 2008}}\n{{globalize|date=2010}}\n}}\n"
                "An '''appellate court''' ({{lang-la|curia appellationis}}) hears appeals "
                "from [[trial court|lower courts]].\n\n"
                "== Gallery ==\n<gallery>\nA.jpg|Caption\n</gallery>\n\n"
                "== Notes ==\n{{notelist}}\n")
    assert mt.clean_wikitext(wikitext) == (
        "An appellate court (curia appellationis) hears appeals from lower courts.")


def test_disambiguation_and_split_helpers():
    assert mt.is_disambiguation("Austin (disambiguation)", "")
    assert mt.is_disambiguation("Ada", "'''Ada''' may refer to:\n* [[Ada (name)]]")
    assert mt.is_disambiguation("Foo", "Text.\n{{disambiguation}}")
    assert not mt.is_disambiguation("Foo", "'''Foo''' is a fruit.")

    body = "\n\n".join(f"Paragraph number {i} is a complete sentence about nothing." for i in range(200))
    arts = [mt.Article(f"Title {i}", body) for i in range(40)]
    ev, ca = mt.split_articles(arts, 20_000, 40_000, 5_000)
    assert ev and ca
    assert not {a.title for a in ev} & {a.title for a in ca}
    assert 18_000 <= len(mt.render(ev)) <= 20_001
    assert 38_000 <= len(mt.render(ca)) <= 40_001
    assert all(len(a.text) <= 5_000 and a.text == body[:len(a.text)] for a in ev + ca)
    assert mt.truncate("Intro sentence.\n\nHeading\n\nLong body " + "x" * 100, 30) == "Intro sentence."
