"""`minitron` command line: thin argparse front-ends that call one stage function each."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from minitron.evaluate import add_eval_parser

    parser = argparse.ArgumentParser(prog="minitron", description="Minitron pruning + distillation + evaluation")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse and dispatch; known user errors print one clear line and exit 2."""
    from minitron.data import DataError
    from minitron.models import ModelLoadError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ModelLoadError, DataError, FileNotFoundError, ValueError) as e:
        print(f"minitron {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
