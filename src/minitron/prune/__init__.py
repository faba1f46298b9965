"""Pruning: activation importance (importance, criteria), the plan (targets, budgets, the JSON prune plan), trimming a
model to it (trim: `prune`, apply_plan), and the architecture search (search). Layer: a stage; imports minitron.eval
(task accuracy as a layer metric, plots), minitron.data and minitron.arch.

`from minitron.prune import prune, PruneConfig, apply_plan, ...`: trim's names are this package's, and the package
is callable: `from minitron import prune; prune(PruneConfig(...))`.
"""

from minitron._api import make_callable
from minitron.prune.trim import *  # noqa: F403

make_callable(__name__, "prune")
