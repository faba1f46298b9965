"""The command line: `minitron prune | distill | correct | eval | search | run | data | plan | export | fetch-data`
(commands; distill and correct's parsers in distill). The top layer.
"""

from minitron.cli.commands import build_parser, main  # noqa: F401
