"""What history and sharing did to results: the embedded digits model in WanPipeline, interval 3.

1. A 1-step warm-up request (other prompt and seed), then the generation: PSNR against full compute,
   and whether the generation equals the one without warm-up.
2. Wan2.2's layout: the digits model and a 2 % scaled copy as ``transformer`` / ``transformer_2``
   (boundary 0.5), both compiled the same way: PSNR against full compute and each expert's call count.

    python benchmarks/trust.py [--steps 20]
"""

from __future__ import annotations

import argparse
import copy

import torch

import cachepass
from cachepass.demo import model as demo
from cachepass.metrics import psnr, relative_l1

OPTIONS = {"policy": "interval", "interval": 3, "inner": "eager"}
DIGITS = [3, 7]


def two_experts(high, low):
    pipe = demo.make_pipeline(high)
    pipe.transformer_2 = low
    pipe.register_to_config(boundary_ratio=0.5)
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    steps = parser.parse_args().steps
    torch.set_num_threads(1)
    with torch.no_grad():
        pipe = demo.make_pipeline()
        full = demo.generate(pipe, DIGITS, num_inference_steps=steps, seed=0)
        pipe.transformer = torch.compile(pipe.transformer, backend="cachepass", options=OPTIONS)
        clean = demo.generate(pipe, DIGITS, num_inference_steps=steps, seed=0)
        demo.generate(pipe, [1, 1], num_inference_steps=1, seed=5)  # the warm-up request
        after = demo.generate(pipe, DIGITS, num_inference_steps=steps, seed=0)
        print(f"warm-up: without {psnr(clean, full):.2f} dB, after a warm-up {psnr(after, full):.2f} dB, "
              f"identical: {torch.equal(clean, after)}")

        torch._dynamo.reset()
        high = demo.load_digits_model()
        low = copy.deepcopy(high)
        for p in low.parameters():
            p.mul_(1.02)
        reference = demo.generate(two_experts(high, low), DIGITS, num_inference_steps=steps, seed=0)
        pipe = two_experts(torch.compile(high, backend="cachepass", options=OPTIONS),
                           torch.compile(low, backend="cachepass", options=OPTIONS))
        out = demo.generate(pipe, DIGITS, num_inference_steps=steps, seed=0)
        print(f"two experts, one program: {psnr(out, reference):.2f} dB, rel L1 {relative_l1(out, reference):.4f}; "
              f"calls: transformer {cachepass.stats(pipe.transformer).calls}, "
              f"transformer_2 {cachepass.stats(pipe.transformer_2).calls}")


if __name__ == "__main__":
    main()
