"""Whether this CPU's bf16 convolutions give fp32's weight gradients, per kernel, stride and input side.

Why: ``vit.precision.stride_past_input`` keeps a run in fp32 where one of its convolutions has a stride larger than its
input, because there torch's CPU bf16 kernel computed wrong weight gradients on the machine the project is built on.
This script prints, for each case, in how many of ``--calls`` fresh calls the bf16 weight gradient was non-finite or
off fp32's by more than bf16's rounding (3% of its largest entry). Figures are printed, never asserted.

    python bench/bf16_convs.py --threads 1
"""

from __future__ import annotations

import argparse

import torch

from vit.machine import cpu_name

CASES = [(k, s, side) for k in (1, 3, 5) for s in (1, 2, 3) for side in (1, 2, 3, 4, 8)]


def wrong_calls(kernel: int, stride: int, side: int, calls: int) -> int:
    wrong = 0
    for _ in range(calls):
        conv = torch.nn.Conv2d(64, 128, kernel, stride, kernel // 2, bias=False)
        x = torch.randn(8, 64, side, side)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            conv(x).float().sum().backward()
        got, conv.weight.grad = conv.weight.grad, None
        conv(x).sum().backward()
        want = conv.weight.grad
        wrong += not torch.isfinite(got).all() or bool((got - want).abs().max() > 0.03 * want.abs().max() + 1e-3)
    return wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads; Conv2d(64, 128), batch 8, padding kernel // 2")
    print("| kernel | stride | input side | stride > side | wrong weight gradients |")
    print("|---|---|---|---|---|")
    for kernel, stride, side in CASES:
        print(
            f"| {kernel} | {stride} | {side} | {'yes' if stride > side else 'no'} | {wrong_calls(kernel, stride, side, args.calls)} of {args.calls} |"
        )


if __name__ == "__main__":
    main()
