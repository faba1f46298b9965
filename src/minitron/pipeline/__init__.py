"""The recipe: RunConfig and its sections, the stage calls in order (stages: `run`), the recipe files' config
helpers (config), and the memory estimate (estimate, memory_terms). Layer: above the stages; imported by the CLI.

`from minitron.pipeline import run, RunConfig, ...`: stages' names are this package's.
"""

from minitron.pipeline.stages import *  # noqa: F403
