"""The stage packages are callable, so that the public API reads `from minitron import prune, distill, evaluate,
run` and each is called as a function (`prune(PruneConfig(...))`) while `minitron.prune.plan`,
`minitron.distill.loop`, ... stay the packages' modules. (In Python a package and a function cannot share a name in
one namespace; a callable module keeps both.)"""

from __future__ import annotations

import sys
import types


class CallableModule(types.ModuleType):
    """A module whose call runs one of its functions (its __call_target__)."""

    def __call__(self, *args, **kwargs):
        return getattr(self, self.__call_target__)(*args, **kwargs)


def make_callable(module_name: str, function: str) -> None:
    """Make sys.modules[module_name] callable: calling it calls its attribute `function`."""
    module = sys.modules[module_name]
    module.__call_target__ = function
    module.__class__ = CallableModule
