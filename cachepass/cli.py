"""The ``cachepass`` command: ``cachepass demo`` (more commands join as they land)."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cachepass", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the embedded digits model, full and with every policy")
    demo.add_argument("--steps", type=int, default=50)
    demo.add_argument("--digits", type=int, nargs="+", default=[0, 3, 5, 8])
    demo.add_argument("--policies", nargs="+", default=None, help="default: every policy")
    demo.add_argument("--inner", default="eager", help="compiler of the graph variants (eager, inductor)")
    demo.add_argument("--repeats", type=int, default=1, help="timed runs per row (median)")
    demo.add_argument("--out", default="cachepass-out", help="folder for the animation and chart")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if args.command == "demo":
        from .demo.run import run_demo

        run_demo(steps=args.steps, digits=tuple(args.digits), policies=args.policies, inner=args.inner,
                 repeats=args.repeats, out_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
