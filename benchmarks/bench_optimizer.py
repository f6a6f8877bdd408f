"""AdamW step time: torch's fused kernel against the for-loop AdamW (the two kava can use,
``train.fused_optimizer``), on the parameter shapes of a Llama-style model, interleaved.

  python benchmarks/bench_optimizer.py --layers 12 --hidden 512 --vocab 32000 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def shapes(layers: int, d: int, vocab: int) -> list[tuple[int, ...]]:
    """A Llama decoder's weight shapes (q, k, v, o, gate, up, down, two norms per layer; embedding, final norm)."""
    per = [(d, d), (d // 2, d), (d // 2, d), (d, d), (4 * d, d), (4 * d, d), (d, 4 * d), (d,), (d,)]
    return [(vocab, d), (d,)] + per * layers


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12, help="decoder layers")
    p.add_argument("--hidden", type=int, default=512, help="hidden size")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    p.add_argument("--iters", type=int, default=10, help="timed rounds (each times both, alternately)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = [torch.randn(s) for s in shapes(args.layers, args.hidden, args.vocab)]
    grads = [torch.randn_like(t) for t in base]
    opts = {}
    for name, kw in (("for_loop", {}), ("fused", {"fused": True})):
        params = [torch.nn.Parameter(t.clone()) for t in base]
        for q, g in zip(params, grads):
            q.grad = g
        opts[name] = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, **kw)
        opts[name].step()  # the state exists before timing
    times = {k: [] for k in opts}
    for _ in range(args.iters):
        for k, o in opts.items():
            t0 = time.perf_counter()
            o.step()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    n = sum(t.numel() for t in base)
    print(
        f"{n / 1e6:.1f} M parameters, {len(base)} tensors, {torch.get_num_threads()} thread(s), load "
        f"{os.getloadavg()[0]:.1f}"
    )
    for k, v in med.items():
        print(f"  {k:<9} {v * 1e3:8.1f} ms per step (median of {args.iters})")
    print(f"  fused / for-loop: {med['fused'] / med['for_loop']:.3f}")
    return med


if __name__ == "__main__":
    main()
