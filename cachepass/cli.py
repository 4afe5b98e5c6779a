"""The ``cachepass`` command: ``cachepass demo``, ``cachepass calibrate`` (more commands join as they land)."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cachepass", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the embedded digits models (Wan, FLUX), full and with every policy")
    demo.add_argument("--model", choices=["wan", "flux", "both"], default="both")
    demo.add_argument("--steps", type=int, default=None, help="denoising steps (default: Wan 50, FLUX 28)")
    demo.add_argument("--digits", type=int, nargs="+", default=[0, 3, 5, 8])
    demo.add_argument("--policies", nargs="+", default=None, help="default: every policy")
    demo.add_argument("--inner", default="eager", help="compiler of the graph variants (eager, inductor)")
    demo.add_argument("--repeats", type=int, default=3, help="timed generations per row, after a warm-up (median)")
    demo.add_argument("--out", default="cachepass-out", help="folder for the animation, image grid and charts")
    demo.add_argument("--threads", type=int, default=None,
                      help="torch CPU threads (default: torch's); 1 keeps timings steady on a busy machine")
    cal = sub.add_parser("calibrate", help="calibrate teacache or magcache on the embedded digits model")
    cal.add_argument("--policy", choices=["teacache", "magcache"], default="teacache")
    target = cal.add_mutually_exclusive_group()
    target.add_argument("--target-speedup", type=float, default=None, help="computed steps <= steps / this")
    target.add_argument("--target-steps", type=int, default=None, help="computed steps per branch (cond, uncond)")
    target.add_argument("--max-error", type=float, default=None, help="predicted relative L1 of the stack output")
    cal.add_argument("--steps", type=int, default=50)
    cal.add_argument("--digits", type=int, nargs="+", default=[0, 3, 5, 8])
    cal.add_argument("--generations", type=int, default=1, help="recorded full generations (seeds 0, 1, ...)")
    cal.add_argument("--degree", type=int, default=4, help="teacache polynomial degree")
    cal.add_argument("--indicator", default="timestep_embedding", choices=["timestep_embedding", "modulated_input"])
    cal.add_argument("--compare", action="store_true",
                     help="also compare default and calibrated teacache at the same computed steps (PSNR)")
    cal.add_argument("--out", default="cachepass-out/digits-profile.json", help="where the profile is written")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if args.command == "demo":
        from .demo.run import run_demo

        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        models = ("wan", "flux") if args.model == "both" else (args.model,)
        run_demo(models=models, steps=args.steps, digits=tuple(args.digits), policies=args.policies, inner=args.inner,
                 repeats=args.repeats, out_dir=args.out)
    elif args.command == "calibrate":
        from .calibration.example import calibrate_digits

        calibrate_digits(args.policy, steps=args.steps, digits=tuple(args.digits), out=args.out,
                         compare=args.compare, generations=args.generations, target_speedup=args.target_speedup,
                         target_steps=args.target_steps, max_error=args.max_error,
                         **({"degree": args.degree, "indicator": args.indicator} if args.policy == "teacache" else {}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
