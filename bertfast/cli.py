"""The ``bertfast`` command: ``bertfast info`` and ``bertfast bench``."""

from __future__ import annotations

import argparse
import json
import sys


def _info(args) -> int:
    from .env_report import format_report, report

    info = report()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="bertfast", description="A custom-kernel performance engine for BERT.")
    parser.add_argument("--version", action="version", version=f"bertfast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, the GPU, and which backends are available (and why not)")
    info.add_argument("--json", action="store_true", help="print the report as JSON")
    info.set_defaults(run=_info)
    bench = commands.add_parser(
        "bench",
        help="check every backend against the reference, then time BERT-large side by side with Hugging Face",
    )
    from .benchmarking import command

    command.add_arguments(bench)
    bench.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
