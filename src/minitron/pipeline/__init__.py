"""The recipe and its run: RunConfig and its sections (recipe), the stage calls in order with their records
(stages: `run`), the recipe files' config helpers (config), and the memory estimate (estimate, memory_terms).
Layer: above the stages; imported by the CLI.

`from minitron.pipeline import run, RunConfig, ...`: stages' names are this package's.
"""

from minitron.pipeline.stages import *  # noqa: F403
