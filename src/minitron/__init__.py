"""minitron: Minitron structured pruning + distillation for Hugging Face causal LMs.

The public API (imported lazily, so `import minitron` stays light):

    from minitron import prune, distill, evaluate, run
    from minitron import PruneConfig, Target, DistillConfig, RunConfig

`prune(PruneConfig(...))`, `distill(DistillConfig(...))`, `evaluate(models, tasks)` and `run(RunConfig)` are the
stages and the whole recipe. Packages, top to bottom (a module imports from its own layer or below; the order is
declared in tests/test_layout.py): cli -> pipeline -> prune / distill / export -> eval -> data -> arch.
"""

from minitron._moved import install as _install_moved

__version__ = "0.1.0"
__all__ = ["DistillConfig", "PruneConfig", "RunConfig", "Target", "distill", "evaluate", "prune", "run"]

_install_moved()

_LAZY = {"PruneConfig": ("minitron.prune", "PruneConfig"), "Target": ("minitron.prune", "Target"),
         "DistillConfig": ("minitron.distill", "DistillConfig"), "RunConfig": ("minitron.pipeline", "RunConfig"),
         "run": ("minitron.pipeline", "run"), "evaluate": ("minitron.eval", "harness"),
         "prune": ("minitron", "prune"), "distill": ("minitron", "distill")}


def __getattr__(name: str):
    """The public names, imported on first use (the stage packages `prune` and `distill` and the evaluation module
    `evaluate` are callable: minitron._api)."""
    import importlib

    if name not in _LAZY:
        raise AttributeError(f"module 'minitron' has no attribute {name!r}")
    module, attr = _LAZY[name]
    if module == "minitron":
        return importlib.import_module(f"minitron.{attr}")
    return getattr(importlib.import_module(module), attr)
