"""Attention kernels on this machine: PyTorch's fused ``F.scaled_dot_product_attention`` against the plain einsum path.

Why: ``MultiHeadAttention(fused=None)`` picks a kernel by one rule (``vit.model.sdpa_is_faster``) from the device, the
dtype the step runs in and the head size. This script prints the measurements the rule rests on, for this machine: one
forward and backward of attention alone, and a forward without gradients (the ``vit.model`` code of both paths, q, k and v given), at the manual's 65
tokens, for several head sizes and both dtypes, and what the rule picks. Figures are printed, never asserted.

    python bench/attention.py --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

from vit.machine import cpu_name
from vit.model import MultiHeadAttention, sdpa_is_faster

# (heads, head dim): the manual's 8 x 8, the fast and budget presets' 4 x 32, and others around them.
SHAPES = ((8, 8), (4, 16), (4, 32), (2, 64), (8, 64), (2, 128))


def time_ms(fused: bool, train: bool, batch: int, heads: int, dim: int, tokens: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    """Milliseconds of one forward (+ backward where ``train``) of the attention alone, best of ``repeats`` after two untimed ones."""
    attention = MultiHeadAttention(heads * dim, heads, fused=fused)
    q, k, v = (torch.randn(batch, heads, tokens, dim, dtype=dtype, device=device, requires_grad=train) for _ in range(3))

    def once() -> None:
        with torch.set_grad_enabled(train):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v) if fused else attention._plain_attention(q, k, v, mask=None, scale=None)
            if train:
                out.sum().backward()

    best = float("inf")
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        once()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--tokens", type=int, default=65, help="tokens per image (default 65: 8 x 8 patches and the class token)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_name()}, {torch.get_num_threads()} torch threads"
    print(
        f"device: {where}; torch {torch.__version__}; attention alone (train: forward + backward; inference: forward), {args.tokens} tokens, best of {args.repeats}"
    )
    dtypes = (torch.float32, torch.bfloat16) if device.type == "cpu" else (torch.float32, torch.bfloat16, torch.float16)
    header = ("pass", "batch", "heads x dim", "dtype", "plain ms", "SDPA ms", "SDPA / plain", "rule picks")
    rows = []
    for train in (True, False):
        for batch in args.batch:
            for heads, dim in SHAPES:
                for dtype in dtypes:
                    plain = time_ms(False, train, batch, heads, dim, args.tokens, dtype, device, args.repeats)
                    fused = time_ms(True, train, batch, heads, dim, args.tokens, dtype, device, args.repeats)
                    pick = "SDPA" if sdpa_is_faster(device, dtype, dim) else "plain"
                    cells = ("train" if train else "inference", str(batch), f"{heads} x {dim}", str(dtype).removeprefix("torch."))
                    rows.append((*cells, f"{plain:.2f}", f"{fused:.2f}", f"{fused / plain:.2f}", pick))
                    print("  " + " | ".join(rows[-1]), flush=True)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print()
    for cells in [header, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())


if __name__ == "__main__":
    main()
