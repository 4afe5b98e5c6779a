"""The embedded FLUX-architecture digits model in diffusers' FluxPipeline with true CFG.

    python examples/flux_pipeline.py [--steps 28] [--policy taylorseer] [--inner eager]

FluxPipeline names each call's branch ("cond" / "uncond") but not the step count, so the example passes
``num_steps``: with it a policy can compute the last steps, which matter most for the final image.
"""

from __future__ import annotations

import argparse

import torch

import cachepass
from cachepass.demo.flux_model import generate_flux, load_digits_flux_model, make_flux_pipeline
from cachepass.metrics import psnr


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--policy", default="taylorseer", choices=cachepass.POLICIES)
    parser.add_argument("--inner", default="eager")
    args = parser.parse_args(argv)

    model = load_digits_flux_model()
    pipe = make_flux_pipeline(model)
    with torch.no_grad():
        reference = generate_flux(pipe, [0, 5], num_inference_steps=args.steps)
        pipe.transformer = torch.compile(model, backend="cachepass", options={
            "policy": args.policy, "inner": args.inner, "num_steps": args.steps})
        cached = generate_flux(pipe, [0, 5], num_inference_steps=args.steps)

    print(cachepass.stats(pipe.transformer))
    print(f"PSNR against full compute: {psnr(cached, reference):.2f} dB")


if __name__ == "__main__":
    main()
