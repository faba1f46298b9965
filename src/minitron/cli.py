"""`minitron` command line: thin argparse front-ends that build a config and call one stage function.

(distill branch: only the distill/correct subcommands; the stage modules own their parsers.)
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from minitron.distill import add_distill_parsers

    parser = argparse.ArgumentParser(prog="minitron", description="Minitron pruning + distillation for HF causal LMs")
    sub = parser.add_subparsers(dest="command", required=True)
    add_distill_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse and dispatch; known user errors print one clear line and exit 2."""
    from minitron.distill import CheckpointError, DistillError
    from minitron.models import ModelLoadError

    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (ModelLoadError, DistillError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"minitron {args.command}: error: {e}", file=sys.stderr)
        return 2
    if result is not None:
        print(f"[minitron] {args.command}: output in {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
