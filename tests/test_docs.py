"""Every ```python block in docs/ runs, so the guides cannot go stale."""

import pathlib
import re

import pytest

from llmopt.core.formats import _FORMATS, unregister_format
from llmopt.kernels import list_kernels, unregister_kernel
from llmopt.methods.base import _METHODS, unregister_method

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)
PAGES = sorted(p for p in DOCS.rglob("*.md") if BLOCK.search(p.read_text()))


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_doc_snippets_run(page):
    formats_before, methods_before, kernels_before = set(_FORMATS), set(_METHODS), set(list_kernels())
    namespace = {"__name__": f"doc_{page.stem}"}  # one page reads top to bottom: later blocks see earlier names
    try:
        for i, code in enumerate(BLOCK.findall(page.read_text())):
            exec(compile(code, f"{page.name}[block {i}]", "exec"), namespace)
    finally:
        for name in set(_FORMATS) - formats_before:
            unregister_format(name)
        for name in set(_METHODS) - methods_before:
            unregister_method(name)
        for name in set(list_kernels()) - kernels_before:
            unregister_kernel(name)


def test_formats_page_has_examples():
    assert any(p.name == "formats.md" for p in PAGES)
