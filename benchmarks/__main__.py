"""``python -m benchmarks <workload> [options]``: one subcommand per workload."""

from __future__ import annotations

import argparse
import importlib
import sys

#: Subcommand -> module. A workload module defines HELP, add_arguments(parser), run(args).
WORKLOADS = {
    "calibrate": "benchmarks.calibrate",
    "linear": "benchmarks.linear",
    "hotpath": "benchmarks.hotpath",
    "fanout": "benchmarks.fanout",
    "recovery": "benchmarks.recovery",
    "backlog": "benchmarks.backlog",
    "latency": "benchmarks.latency",
    "soak": "benchmarks.soak",
    "publish": "benchmarks.publish",
    "purge": "benchmarks.purge",
    "codec": "benchmarks.codec",
    "api": "benchmarks.api",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="leaseflow benchmarks (see BENCHMARKS.md)"
    )
    sub = parser.add_subparsers(dest="workload", required=True, metavar="WORKLOAD")
    for name, module_name in WORKLOADS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
