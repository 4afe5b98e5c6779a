"""What the pass finds in a model, before anything is cached: ``cachepass.explain``.

    python examples/explain_model.py [--policy dbcache] [--Fn 2]

Prints the block stack(s), the residual stream, the timestep input, the indicators and where the
policy's options put the cut, for the embedded Wan digits model.
"""

from __future__ import annotations

import argparse

import torch

import cachepass
from cachepass.demo import load_digits_model, prompt_embeds_for


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="dbcache", choices=cachepass.POLICIES)
    parser.add_argument("--Fn", type=int, default=None, help="dbcache: front blocks computed on every call")
    args = parser.parse_args(argv)

    model = load_digits_model()
    options = {"Fn": args.Fn} if args.Fn is not None and args.policy == "dbcache" else {}
    latents = torch.randn(1, 1, 4, 16, 16)
    report = cachepass.explain(model, hidden_states=latents, timestep=torch.tensor([500]),
                               encoder_hidden_states=prompt_embeds_for([3]), policy=args.policy, options=options)
    print(report)


if __name__ == "__main__":
    main()
