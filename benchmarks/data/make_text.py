"""Build the evaluation and calibration text files from real English Wikipedia prose.

Source: the shortened English Wikipedia XML dump that gensim ships as test data
(``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
inside the gensim 4.4.0 wheel). The member is read straight out of the wheel (a zip file);
gensim is neither installed nor imported.

Steps:

1. parse the MediaWiki XML with ``xml.etree.ElementTree.iterparse`` and keep main-namespace
   articles (ns 0) that are neither redirects, disambiguation pages nor "List of" pages;
2. turn each article's wikitext into plain prose with :func:`clean_wikitext` (templates, tables,
   references, files, categories, HTML and markup removed; link labels kept; boilerplate
   sections such as "References" dropped);
3. order the articles by the SHA-256 of their title and deal them out, whole, to ``eval.txt``
   (about 120,000 characters) and ``calib.txt`` (about 250,000 characters), so the two files
   never share an article.

Standard library only. Usage::

    python benchmarks/data/make_text.py --wheel /path/to/gensim-4.4.0-...whl
    python benchmarks/data/make_text.py            # runs `pip download --no-deps gensim==4.4.0`
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import html
import io
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Callable, NamedTuple

GENSIM_VERSION = "4.4.0"
MEMBER = ("gensim/test/test_data/"
          "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
# sha256 of the bz2 member in the gensim 4.4.0 wheel (the same file for every platform tag).
MEMBER_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"

HERE = Path(__file__).resolve().parent
EVAL_CHARS = 120_000
CALIB_CHARS = 250_000
MAX_ARTICLE_CHARS = 10_000   # keep at most this much of any one article: more articles, more topics
MIN_ARTICLE_CHARS = 1_500    # skip articles whose cleaned prose is shorter than this
MIN_TAIL_CHARS = 1_500       # do not start a new article in a file with less room than this left


# --------------------------------------------------------------------------------------------
# wikitext -> prose
# --------------------------------------------------------------------------------------------

DROP_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "bibliography",
    "footnotes", "sources", "citations", "notes and references", "references and notes",
    "works cited", "selected bibliography", "primary sources", "secondary sources",
    "gallery", "external link", "related articles", "bibliography and further reading",
    "selected works", "works", "publications", "filmography", "discography",
}

# link namespaces whose links are dropped entirely (the target is not prose)
DROP_LINK_PREFIXES = {"file", "image", "category", "media"}
# interlanguage / interwiki prefix without a label: "[[de:Anarchismus]]", "[[zh-min-nan:...]]"
_INTERLANG = re.compile(r"^:?[a-z]{2,3}(?:-[a-z0-9]+)*\s*:", re.IGNORECASE)

# elements whose content is not prose
_DROP_ELEMENTS = ("ref", "math", "gallery", "timeline", "score", "syntaxhighlight", "source",
                  "imagemap", "hiero", "chem", "ce", "graph", "references", "mapframe", "code",
                  "templatedata", "noinclude", "poem")

_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.DOTALL)
_SELF_CLOSING_REF = re.compile(r"<ref\b[^>]*/\s*>", re.IGNORECASE)
_DROP_ELEMENT_RES = [re.compile(rf"<{t}\b[^>]*>.*?</{t}\s*>", re.IGNORECASE | re.DOTALL)
                     for t in _DROP_ELEMENTS]
# elements whose removal leaves a hole in the sentence (the paragraph is then dropped)
_HOLE_ELEMENTS = ("math", "chem", "ce", "code", "score", "hiero", "timeline", "syntaxhighlight", "source")
_HOLE = "\x00"        # removed formula/code: the sentence around it is broken
_GAP = "\x01"         # removed unknown template: a gap if inline, harmless on a line of its own
_UNCLOSED_REF = re.compile(r"<ref\b[^>]*>[^<\n]*", re.IGNORECASE)
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*\b[^<>]*?/?>")
_MAGIC = re.compile(r"__[A-Z]+__")
_EXT_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+(?:\s+([^\]]*))?\]")
_BARE_URL = re.compile(r"\bhttps?://[^\s<>\]]+")
_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
_QUOTES = re.compile(r"'{2,}")
_LIST_MARK = re.compile(r"^[*#:;]+\s*")

# inline templates whose text belongs to the sentence; everything else is dropped
_KEEP_LAST_ARG = {"lang", "transl", "nowrap", "small", "smaller", "big", "nobr", "vr", "keypress",
                  "sic", "em", "strong", "lang-en", "center", "resize", "nobold", "noitalic",
                  "sc", "small caps", "script", "nastaliq", "rtl-lang"}
_KEEP_FIRST_ARG = {"nihongo", "abbr", "visible anchor", "vanchor", "ill", "interlanguage link",
                   "proper name", "linktext", "w", "gloss", "mvar", "math", "var"}
_LITERAL = {"nbsp": " ", "'s": "'s", "·": "·", "snd": " – ", "ndash": "–", "mdash": "—",
            "spaced ndash": " – ", "-": "-", "'": "'", "=": "=", "sp": " ", "thinsp": " ",
            "'\"": "'\"", "\"'": "\"'", "mdashb": " — ", "dash": " – ", "and": " and "}


# templates that carry no sentence text (citations, hatnotes, maintenance tags, boxes,
# pronunciation guides, ...): removing them leaves grammatical prose
_SILENT_TEMPLATE = re.compile(
    r"^(?:cite|citation|vcite|sfn|harv|efn|refn|rp$|r$|ref|notetag|note|citation needed|cn$|fact$|"
    r"clarify|dead link|when$|who$|which$|by whom|according to whom|page needed|pages needed|"
    r"verify|failed verification|better source|dubious|vague|weasel|peacock|original research|"
    r"infobox|taxobox|automatic taxobox|speciesbox|navbox|navboxes|sidebar|.* sidebar$|.* navbox$|"
    r"main|see also|further|details|about|other uses|otheruses|redirect|for$|distinguish|hatnote|"
    r"dablink|selfref|self reference|short description|use |pp-|good article|featured article|"
    r"commons|wikt|wiktionary|wikiquote|wikisource|wikibooks|wikinews|wikiversity|wikivoyage|"
    r"wikispecies|wikipedia books|sister|spoken wikipedia|portal|authority control|dmoz|"
    r"refimprove|more footnotes|more citations|unreferenced|multiple issues|expand|cleanup|"
    r"copy ?edit|update|globalize|pov|inconsistent citations|citation style|no more links|"
    r"clear|reflist|refbegin|refend|div col|col-|columns-list|toc|compact toc|anchor|coord|"
    r"ipa|ipac|ipa-|respell|pronunciation|audio|listen|flagicon|multiple image|double image|"
    r"image|wide image|quote box|webarchive|wayback|s-|end$|start$|library resources box|"
    r"internet archive|librivox|gutenberg|youtube|imdb|official website|subject bar|"
    r"lsj|clade|chart|bar|legend|plainlist|flatlist|hlist|"
    r"endplainlist|endflatlist|nbsp|'|!|·|•|dot|bull|spaces|hidden|collapse|"
    r"geographic location|location map|stack|bots|dts|sort|nts|inflation-fn|pie chart|"
    r"graph|timeline|sup|small caps)", re.IGNORECASE)


def _split_params(inner: str) -> list[str]:
    """Split a template's inner text on top-level '|' (links are already resolved)."""
    return [p.strip() for p in inner.split("|")]


def _template(inner: str) -> str:
    """Replacement text for one ``{{...}}`` template (its inner text, nested ones resolved)."""
    parts = _split_params(inner)
    name = parts[0].strip().lower().replace("_", " ")
    args = [p for p in parts[1:] if "=" not in p.split(" ")[0] and not re.match(r"^\w[\w ]*=", p)]
    if name in _LITERAL:
        return _LITERAL[name]
    if name in ("convert", "cvt") and len(args) >= 2:
        # {{convert|10|km|mi}} -> "10 km"; {{convert|1|to|3|m}} -> "1 to 3 m"
        if len(args) >= 4 and args[1] in ("to", "-", "and", "–", "or", "by", "x", "×"):
            sep = "–" if args[1] in ("-", "–") else f" {args[1]} "
            return f"{args[0]}{sep}{args[2]} {args[3]}"
        return f"{args[0]} {args[1]}"
    if name in ("as of", "asof") and args:
        return "As of " + " ".join(args[:3])
    if name.startswith("lang-") and args:
        return args[-1]
    if name in _KEEP_LAST_ARG and args:
        return args[-1]
    if name in _KEEP_FIRST_ARG and args:
        return args[0]
    if name in ("frac", "sfrac") and args:
        return "/".join(args[-2:]) if len(args) >= 2 else "1/" + args[0]
    if name in ("circa", "c.") and args:
        return "c. " + args[0]
    if name in ("quote", "cquote", "blockquote", "quotation", "bquote", "quote frame", "poem quote") and args:
        return "\n\n" + args[0] + "\n\n"
    if name in ("flag", "flagcountry", "flagu") and args:
        return args[0]
    if _SILENT_TEMPLATE.match(name):
        return ""
    return _GAP   # an unknown template inside a sentence would leave a gap: mark it


def _balanced(text: str, open_: str, close: str, handler: Callable[[str], str]) -> str:
    """Replace every balanced ``open_ ... close`` span (innermost first) by ``handler(inner)``.

    Unbalanced openers are kept as literal text minus the opener; stray closers are dropped.
    """
    stack: list[list[str]] = [[]]
    i, n = 0, len(text)
    lo, lc = len(open_), len(close)
    while i < n:
        if text.startswith(open_, i):
            stack.append([])
            i += lo
        elif text.startswith(close, i):
            if len(stack) > 1:
                inner = "".join(stack.pop())
                stack[-1].append(handler(inner))
            i += lc
        else:
            j = i + 1
            # copy a run of ordinary characters at once
            while j < n and text[j] not in (open_[0], close[0]):
                j += 1
            stack[-1].append(text[i:j])
            i = j
    while len(stack) > 1:  # unclosed spans: keep their text
        inner = "".join(stack.pop())
        stack[-1].append(inner)
    return "".join(stack[0])


def _link(inner: str) -> str:
    """Replacement for the inside of one ``[[...]]`` link."""
    target, _, label = inner.partition("|")
    prefix = target.split(":", 1)[0].strip().lower().lstrip(":") if ":" in target else ""
    if prefix in DROP_LINK_PREFIXES and not target.lstrip().startswith(":"):
        return ""
    if label:
        return label.strip()   # "[[a|b|c]]" leaves "b|c"; _tidy removes the stray pipe
    if _INTERLANG.match(target) and not target.startswith(":"):
        return ""
    target = target.strip().lstrip(":")
    if prefix in DROP_LINK_PREFIXES:  # "[[:Category:Foo]]" -> "Category:Foo" is not prose either
        return ""
    return target.split("#", 1)[0] if not target.startswith("#") else target[1:]


def _drop_tables(text: str) -> str:
    """Remove ``{| ... |}`` tables, nested ones included (line based, as MediaWiki parses them)."""
    out, depth = [], 0
    for line in text.split("\n"):
        s = line.lstrip()
        if s.startswith("{|"):
            depth += 1
            continue
        if depth:
            if s.startswith("|}"):
                depth -= 1
            continue
        out.append(line)
    return "\n".join(out)


def _link_share(line: str) -> float:
    """Fraction of a raw line's visible characters that sit inside ``[[...]]`` links."""
    body = _LIST_MARK.sub("", line)
    if not body.strip():
        return 1.0
    inside = sum(len(m.group(0)) for m in re.finditer(r"\[\[[^\[\]]*\]\]", body))
    return inside / max(1, len(body.strip()))


_FINAL = re.compile(r"[.!?:\"'\u201d\u2019)\]]$")   # how a paragraph of prose ends


_ITEM_FINAL = re.compile(r"[.!?\"\u201d]$")           # how a list item that is a sentence ends


def _sentence_like(par: str) -> bool:
    """Prose has a fair share of lower-case words (names, captions and taxon lists do not)."""
    words = [w for w in par.split() if w[:1].isalpha()]
    if not words:
        return False
    lower = sum(1 for w in words if w[0].islower())
    return lower >= 0.3 * len(words)


def _tidy(par: str) -> str:
    """Collapse whitespace and repair punctuation left behind by removed markup."""
    par = re.sub(r"\s*\|\s*", " ", par)                 # stray pipes from broken markup
    par = re.sub(r"\s+", " ", par).strip()
    par = re.sub(r"\s+([,.;:!?)\]])", r"\1", par)
    par = re.sub(r"\(\s*(?:[,;:]\s*)+", "(", par)      # "(, ; born 1905)" -> "(born 1905)"
    par = re.sub(r"(?:\s*[,;:])+\s*\)", ")", par)
    par = re.sub(r"\(\s*(?:or|also)?\s*\)", "", par)    # "( )" and "(or )" left by dropped IPA
    par = re.sub(r"\[\s*\]", "", par)
    par = re.sub(r"\s+([,.;:!?)\]])", r"\1", par)
    par = re.sub(r"([(\[])\s+", r"\1", par)
    par = re.sub(r"([,;:])(?=[,;:.])", "", par)          # ",." -> "."
    par = re.sub(r"\s{2,}", " ", par)
    return par.strip()


def clean_wikitext(text: str) -> str:
    """Convert one article's wikitext to plain prose.

    Paragraphs are separated by one blank line; section headings become lines of their own
    (their own paragraphs). Boilerplate sections (References, External links, See also, ...),
    tables, templates, references, files, categories, interlanguage links and HTML are removed.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _COMMENT.sub("", text)
    text = re.sub(r"<nowiki\s*/>", "", text, flags=re.IGNORECASE)
    text = _SELF_CLOSING_REF.sub("", text)
    for tag, rx in zip(_DROP_ELEMENTS, _DROP_ELEMENT_RES):
        text = rx.sub(_HOLE if tag in _HOLE_ELEMENTS else "", text)
    text = _UNCLOSED_REF.sub("", text)
    text = _MAGIC.sub("", text)
    # links first (so that '|' inside a link does not split a template's parameters), but keep
    # the raw form of list lines to judge whether they are mostly links
    text = _drop_tables(text)
    lines = text.split("\n")
    kept = []
    for line in lines:
        if _LIST_MARK.match(line) and not line.startswith((":", ";")) and _link_share(line) > 0.5:
            continue
        kept.append(line)
    text = "\n".join(kept)
    text = _balanced(text, "[[", "]]", _link)
    text = _balanced(text, "{{", "}}", _template)
    text = _drop_tables(text)  # tables that only appeared once templates were resolved
    text = _EXT_LINK.sub(lambda m: m.group(1) or "", text)
    text = _BARE_URL.sub("", text)
    text = _BR.sub(" ", text)
    text = _TAG.sub("", text)
    text = _QUOTES.sub("", text)
    text = html.unescape(text).replace("\u00a0", " ").replace("\u200b", "")

    paragraphs: list[tuple[bool, str]] = []   # (is_heading, text)
    skip_level = 0                            # >0 while inside a dropped section
    buf: list[str] = []

    def flush() -> None:
        if buf:
            par = _tidy(" ".join(buf))
            if par:
                paragraphs.append((False, par))
            buf.clear()

    for line in text.split("\n"):
        m = _HEADING.match(line.strip())
        if m:
            flush()
            level, title = len(m.group(1)), _tidy(m.group(2))
            if skip_level and level > skip_level:
                continue
            skip_level = 0
            if title.lower().rstrip(":") in DROP_SECTIONS:
                skip_level = level
                continue
            if title:
                paragraphs.append((True, title))
            continue
        if skip_level:
            continue
        stripped = line.strip()
        if _GAP in stripped and not stripped.replace(_GAP, "").strip(" .,;:*#"):
            flush()                     # a block template (navbox, column list, ...) on its own line
            continue
        if not stripped:
            flush()
            continue
        if stripped.startswith(("|", "!", "{|", "|}")):     # table debris
            continue
        if _LIST_MARK.match(stripped):
            flush()
            item = _tidy(_LIST_MARK.sub("", stripped))
            # keep items that are sentences, not "Albania" or "Order X Smith 1998"
            if len(item.split()) >= 8 and _sentence_like(item) and _ITEM_FINAL.search(item):
                paragraphs.append((False, item))
            continue
        buf.append(stripped)
    flush()

    # drop paragraphs that are not sentences, then headings left without a body
    prose: list[tuple[bool, str]] = []
    for is_head, par in paragraphs:
        if is_head and (_HOLE in par or _GAP in par or len(par) > 120):
            is_head = False
        if not is_head and (_HOLE in par or _GAP in par or len(par.split()) < 4
                            or not _sentence_like(par) or not _FINAL.search(par)):
            continue
        prose.append((is_head, par))
    # a paragraph that introduces a dropped list ("... include:") reads oddly on its own
    prose = [(h, p) for k, (h, p) in enumerate(prose)
             if h or not p.endswith(":") or (k + 1 < len(prose) and not prose[k + 1][0])]
    # headings whose section body was removed entirely
    out: list[str] = []
    for k, (is_head, par) in enumerate(prose):
        if is_head:
            nxt = prose[k + 1] if k + 1 < len(prose) else None
            if nxt is None or nxt[0]:
                continue
        out.append(par)
    return "\n\n".join(out)


# --------------------------------------------------------------------------------------------
# dump -> articles
# --------------------------------------------------------------------------------------------

_DISAMBIG = re.compile(r"\{\{\s*(?:disambig\w*|dab|hndis|geodis|set index|surname|given name)\b",
                       re.IGNORECASE)


class Article(NamedTuple):
    title: str
    text: str   # cleaned prose (paragraphs separated by blank lines)


def is_disambiguation(title: str, wikitext: str) -> bool:
    if "(disambiguation)" in title.lower():
        return True
    if _DISAMBIG.search(wikitext):
        return True
    head = wikitext[:3000]
    return bool(re.search(r"may (?:also )?refer to\s*:", head))


def iter_pages(xml_bytes_stream) -> Iterator[tuple[str, int, bool, str]]:
    """Yield (title, ns, is_redirect, wikitext) for every <page> of a MediaWiki export."""
    for _event, elem in ET.iterparse(xml_bytes_stream, events=("end",)):
        tag = elem.tag.rsplit("}", 1)[-1]
        if tag != "page":
            continue
        title = ns = text = None
        redirect = False
        for child in elem.iter():
            ctag = child.tag.rsplit("}", 1)[-1]
            if ctag == "title":
                title = child.text or ""
            elif ctag == "ns":
                ns = int((child.text or "0").strip())
            elif ctag == "redirect":
                redirect = True
            elif ctag == "text":
                text = child.text or ""
        if ns is None:  # very old exports have no <ns>: infer from the title
            ns = 0 if ":" not in (title or "") else -999
        yield title or "", ns, redirect, text or ""
        elem.clear()


def load_articles(xml_stream) -> list[Article]:
    arts = []
    seen = set()
    for title, ns, redirect, wikitext in iter_pages(xml_stream):
        if ns != 0 or redirect or wikitext.lstrip().lower().startswith("#redirect"):
            continue
        if is_disambiguation(title, wikitext) or title.lower().startswith("list of"):
            continue
        if title in seen:
            continue
        prose = clean_wikitext(wikitext)
        if len(prose) < MIN_ARTICLE_CHARS:
            continue
        seen.add(title)
        arts.append(Article(title, prose))
    return arts


def title_key(title: str) -> str:
    return hashlib.sha256(title.encode("utf-8")).hexdigest()


def truncate(text: str, limit: int) -> str:
    """Whole paragraphs from the start of ``text``, at most ``limit`` characters; no trailing heading."""
    pars = text.split("\n\n")
    out: list[str] = []
    size = 0
    for par in pars:
        add = len(par) + (2 if out else 0)
        if size + add > limit:
            break
        out.append(par)
        size += add
    # no trailing heading (a short paragraph without final punctuation) nor "... as follows:"
    while out and (_looks_like_heading(out[-1]) or out[-1].endswith(":")):
        out.pop()
    return "\n\n".join(out)


def _looks_like_heading(par: str) -> bool:
    return len(par) < 120 and not re.search(r"[.!?:;\"')\]]$", par)


def split_articles(arts: Sequence[Article], eval_chars: int, calib_chars: int,
                   max_article_chars: int) -> tuple[list[Article], list[Article]]:
    """Deal articles, in SHA-256-of-title order, to the file furthest below its target.

    Every article goes to at most one file. Each kept article is cut (at a paragraph
    boundary) to ``max_article_chars`` and to the room left in its file.
    """
    targets = {"eval": eval_chars, "calib": calib_chars}
    chosen = {"eval": [], "calib": []}
    used = {"eval": 0, "calib": 0}
    for art in sorted(arts, key=lambda a: title_key(a.title)):
        open_ = [k for k in ("eval", "calib") if targets[k] - used[k] >= MIN_TAIL_CHARS]
        if not open_:
            break
        which = min(open_, key=lambda k: used[k] / targets[k])
        sep = 2 if chosen[which] else 0            # blank line between articles
        room = targets[which] - used[which] - sep - len(art.title) - 2
        body = truncate(art.text, min(max_article_chars, room))
        if len(body) < min(MIN_TAIL_CHARS, room):
            continue
        piece = Article(art.title, body)
        chosen[which].append(piece)
        used[which] += sep + len(piece.title) + 2 + len(body)
    return chosen["eval"], chosen["calib"]


def render(arts: Sequence[Article]) -> str:
    return "\n\n".join(f"{a.title}\n\n{a.text}" for a in arts) + "\n"


# --------------------------------------------------------------------------------------------
# wheel handling
# --------------------------------------------------------------------------------------------

def download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"gensim=={GENSIM_VERSION}", "-d", str(dest)]
    print("running:", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob(f"gensim-{GENSIM_VERSION}-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download produced no gensim wheel in {dest}")
    return wheels[0]


def read_member(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        try:
            data = zf.read(MEMBER)
        except KeyError:
            raise SystemExit(f"{wheel} has no member {MEMBER}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != MEMBER_SHA256:
        print(f"warning: {MEMBER} has sha256 {digest}, expected {MEMBER_SHA256}; "
              "the output will differ from the shipped files", file=sys.stderr)
    return data


def stats(text: str, arts: Sequence[Article]) -> str:
    return (f"{len(arts)} articles, {len(text)} characters, {len(text.split())} words, "
            f"{len(text.encode('utf-8'))} bytes")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheel", type=Path, help=f"gensim {GENSIM_VERSION} wheel (default: pip download it)")
    ap.add_argument("--out-dir", type=Path, default=HERE,
                    help="where eval.txt / calib.txt go (default: %(default)s)")
    ap.add_argument("--eval-chars", type=int, default=EVAL_CHARS)
    ap.add_argument("--calib-chars", type=int, default=CALIB_CHARS)
    ap.add_argument("--max-article-chars", type=int, default=MAX_ARTICLE_CHARS)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or download_wheel(Path(tmp))
        raw = read_member(wheel)
    xml_bytes = bz2.decompress(raw)
    arts = load_articles(io.BytesIO(xml_bytes))
    print(f"{len(arts)} usable articles in the dump")
    ev, ca = split_articles(arts, args.eval_chars, args.calib_chars, args.max_article_chars)
    assert not {a.title for a in ev} & {a.title for a in ca}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("eval.txt", ev), ("calib.txt", ca)):
        text = render(part)
        path = args.out_dir / name
        with open(path, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        print(f"{name:<10} {stats(text, part)}")
        print(f"{'':<10} sha256 {hashlib.sha256(text.encode('utf-8')).hexdigest()}")
        print(f"{'':<10} titles: {'; '.join(a.title for a in part)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
