"""Old module paths (minitron <= 0.1.0 had flat modules) -> where they live now. For one release
`import minitron.importance` (and every old path) still works, with a FutureWarning naming the new path: an import
hook serves the new module under the old name (the same module object, so state and patches are shared)."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {  # old -> new, without "minitron."
    "moe": "arch.moe", "mamba": "arch.mamba", "models": "arch.models", "files": "arch.files", "ranks": "arch.ranks",
    "tiny": "arch.tiny", "gguf_tokenizer": "arch.gguf_tokenizer",
    "store": "data.store", "store_sources": "data.sources", "store_blocks": "data.blocks", "store_blends": "data.blends",
    "fingerprint": "data.fingerprint",
    "evaluate": "eval.harness", "tasks": "eval.tasks", "report": "eval.report",
    "importance": "prune.importance", "criteria": "prune.criteria", "plan": "prune.plan", "search": "prune.search",
    "losses": "distill.losses", "topk_cache": "distill.topk_cache", "distill.cli": "cli.distill",
    "export_gguf": "export.gguf", "gguf_families": "export.families", "gguf_hparams": "export.hparams",
    "gguf_runtime": "export.runtime", "gguf_ssm": "export.ssm", "gguf_tensors": "export.tensors",
    "config": "pipeline.config", "estimate": "pipeline.estimate", "memory_terms": "pipeline.memory_terms",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        old = fullname.removeprefix("minitron.")
        if fullname.startswith("minitron.") and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = "minitron." + MOVED[spec.name.removeprefix("minitron.")]
        warnings.warn(f"{spec.name} is deprecated: import {new} (the old path goes in the next release)",
                      FutureWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
