"""Evaluation: task readers (tasks), scoring as the LM Evaluation Harness scores (harness: `evaluate`,
perplexity, speed, results files), the run report, model card and plots (report). Layer: imports minitron.data and
minitron.arch.
"""

from minitron._api import make_callable
from minitron.eval import harness

make_callable(harness.__name__, "evaluate")  # `from minitron import evaluate; evaluate(models, tasks)`
