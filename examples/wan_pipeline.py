"""TeaCache on the embedded Wan digits model inside diffusers' own WanPipeline, unchanged.

    python examples/wan_pipeline.py [--steps 30] [--policy teacache] [--inner eager]

Prints which steps each CFG branch computed and how close the cached generation is to full compute.
"""

from __future__ import annotations

import argparse

import torch

import cachepass
from cachepass.demo import generate, load_digits_model, make_pipeline
from cachepass.metrics import psnr


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--policy", default="teacache", choices=cachepass.POLICIES)
    parser.add_argument("--inner", default="eager", help="compiler of the graph pieces (inductor is slow to compile on CPU)")
    args = parser.parse_args(argv)

    model = load_digits_model()
    pipe = make_pipeline(model)
    with torch.no_grad():
        reference = generate(pipe, [3, 7], num_inference_steps=args.steps)

        # The one line: the pipeline, its CFG branches and its step count need nothing else.
        pipe.transformer = torch.compile(model, backend="cachepass",
                                         options={"policy": args.policy, "inner": args.inner})
        cached = generate(pipe, [3, 7], num_inference_steps=args.steps)

    print(cachepass.stats(pipe.transformer))
    print(f"PSNR against full compute: {psnr(cached, reference):.2f} dB")


if __name__ == "__main__":
    main()
