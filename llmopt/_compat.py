"""Old module paths (before the layered tree) keep working for one release, with a ``DeprecationWarning``.

``import llmopt.quant.formats`` gives the module object now at ``llmopt.core.formats`` (the same object,
so monkeypatching either name patches both). One table, no shim files in the tree: the folders stay the
layer diagram.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Dict

__all__ = ["MOVED_MODULES", "install"]

MOVED_MODULES: Dict[str, str] = {
    "llmopt.quant": "llmopt.methods.quant",
    "llmopt.quant.formats": "llmopt.core.formats",
    "llmopt.quant.packing": "llmopt.core.packing",
    "llmopt.quant.primitives": "llmopt.core.primitives",
    "llmopt.prune": "llmopt.methods.prune",
    "llmopt.lowrank": "llmopt.methods.lowrank",
    "llmopt.lowrank.activation_aware": "llmopt.solvers.decompose",
    "llmopt.targets": "llmopt.core.targets",
    "llmopt.analysis": "llmopt.core.measure",
    "llmopt.config": "llmopt.methods.base",
    "llmopt.registry": "llmopt.methods.base",
    "llmopt.api": "llmopt.pipeline.api",
    "llmopt.recipe": "llmopt.pipeline.recipe",
    "llmopt.allocate": "llmopt.pipeline.allocate",
    "llmopt.hf": "llmopt.io.hf",
    "llmopt.nn.common": "llmopt.nn.base",
    **{f"llmopt.quant.{m}": f"llmopt.methods.quant.{m}"
       for m in ("rtn", "hqq", "gptq", "awq", "smoothquant", "scaling", "qat")},
    **{f"llmopt.prune.{m}": f"llmopt.methods.prune.{m}"
       for m in ("criteria", "magnitude", "patterns", "schedule", "sparsegpt", "structured", "wanda")},
    **{f"llmopt.lowrank.{m}": f"llmopt.methods.lowrank.{m}" for m in ("svd", "compensation", "lora")},
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, new_name: str):
        self.new_name = new_name

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {self.new_name}; the old path will be removed in the next release",
                      DeprecationWarning, stacklevel=2)
        module = importlib.import_module(self.new_name)
        self.own_spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # The module already ran under its new name; the import system has just stamped the alias
        # spec on it, so put its own back (reload, pickling and torch.compile read __spec__).
        module.__spec__ = self.own_spec


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new_name = MOVED_MODULES.get(fullname)
        if new_name is None:
            return None
        is_package = importlib.util.find_spec(new_name).submodule_search_locations is not None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new_name), is_package=is_package)


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder())
