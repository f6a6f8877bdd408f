"""R-KV redundancy term: the O(N d) form against the N x N definition (see benchmarks/README.md).

Times ``kava.distill.compression.rkv.redundancy_scores`` (sum of cosines through the sum of unit keys)
and ``redundancy_scores_quadratic`` (the full cosine matrix) round-robin on the same keys, the
shape ``compress_cache`` scores (layers folded into the batch), checks that both keep the same
positions, and prints the ratio.

  python benchmarks/bench_redundancy.py    # Llama-1B-like: 16 layers x batch 16, 8 KV heads, CoT 256, d 64
  python benchmarks/bench_redundancy.py --layers 4 --batch 64 --heads 2 --cot 30 --dim 32   # the tiny config
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kava.distill.compression.base import top_budget
from kava.distill.compression.rkv import redundancy_scores, redundancy_scores_quadratic


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--heads", type=int, default=8, help="KV heads")
    p.add_argument("--cot", type=int, default=256, help="CoT positions N")
    p.add_argument("--dim", type=int, default=64, help="head size d")
    p.add_argument("--budget", type=int, default=24, help="M, for the selection check")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    b = args.layers * args.batch
    keys = torch.randn(b, args.heads, args.cot, args.dim, generator=g).to(dev)
    cot = (torch.rand(b, args.cot, generator=g) > 0.1).to(dev)
    fns = {"O(N d)": redundancy_scores, "N x N": redundancy_scores_quadratic}
    same = [top_budget(f(keys, cot), cot, args.budget) for f in fns.values()]
    identical = torch.equal(same[0][0], same[1][0]) and torch.equal(same[0][1], same[1][1])
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():  # warm-up
        f(keys, cot)
    for _ in range(args.iters):
        for name, f in fns.items():
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            f(keys, cot)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    nxn_bytes = b * args.heads * args.cot * args.cot * 4
    print(
        f"keys [{b}, {args.heads}, {args.cot}, {args.dim}] ({args.layers} layers x batch {args.batch}), device {dev}, "
        f"torch threads {torch.get_num_threads()}, median of {args.iters}"
    )
    for k, v in med.items():
        print(f"  {k:<7} {v * 1e3:9.2f} ms")
    print(
        f"  speed-up {med['N x N'] / med['O(N d)']:.2f}x; same selections (budget {args.budget}): {identical}; "
        f"the N x N form's similarity matrix alone: {nxn_bytes / 2**20:.0f} MiB"
    )
    return {"median_s": med, "speedup": med["N x N"] / med["O(N d)"], "identical": identical, "nxn_bytes": nxn_bytes}


if __name__ == "__main__":
    main()
