"""``kava teacher extract``: write the compressed teacher targets of the training data to disk."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_extract(args: argparse.Namespace) -> int:
    from ..config import ConfigError, load_config
    from ..distill.extract import extract

    cfg = load_config(args.config, args.overrides)
    out = args.out or cfg.loss.teacher_cache
    if not out:
        raise ConfigError("config field 'loss.teacher_cache': empty; give --out DIR or set loss.teacher_cache")
    from ..io import check_output_folder

    what = "--out" if args.out else "loss.teacher_cache"
    check_output_folder(out, what)
    from ..io import OutputError
    from ..model.checkpoints import enclosing_checkpoint

    inside = enclosing_checkpoint(out)
    if inside is not None:
        raise OutputError(
            f"{what} {out}: it is or lies inside the kava checkpoint {inside}; choose a folder outside it"
        )
    if (Path(out) / "status.json").is_file():  # a run folder: its own files would mix with the cache's
        raise OutputError(f"{what} {out}: a run folder (it holds status.json); choose another folder")
    if args.batch_size > cfg.limits.max_batch_size:
        raise ConfigError(
            f"--batch-size {args.batch_size:,}: beyond the sanity bound limits.max_batch_size="
            f"{cfg.limits.max_batch_size:,} (set limits.max_batch_size=N to raise it if you mean it)"
        )
    if cfg.train.num_threads:
        import torch

        torch.set_num_threads(cfg.train.num_threads)
    res = extract(
        cfg, out, shard_size=args.shard_size, shard=args.shard, num_shards=args.num_shards, batch_size=args.batch_size
    )
    print(
        f"teacher cache {res['out']}: {res['num_examples']} examples in {res['num_shards']} shard(s); "
        f"wrote {len(res['written'])}, skipped {len(res['skipped'])} already complete"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``kava teacher`` (with ``extract``) to the ``kava`` command."""
    from .types import count_int, positive_int

    p = subparsers.add_parser(
        "teacher", help="offline teacher caches (compressed KV targets written once, read by training)"
    )
    sub = p.add_subparsers(dest="teacher_command", required=True)
    e = sub.add_parser(
        "extract",
        help="run the teacher over the training data and write its compressed KV and CODI targets",
        description="Writes manifest.json and shard-NNNNN.safetensors to DIR. Finished shards are skipped on a re-run; "
        "--shard I --num-shards K (a job array) writes shards I, I+K, I+2K, ... only. "
        "Train from it with loss.teacher_cache=DIR.",
    )
    e.add_argument("--config", help="YAML config file (the one training will use)")
    e.add_argument("--out", help="cache folder (default: loss.teacher_cache)")
    e.add_argument("--shard-size", type=positive_int, default=1024, help="examples per shard file")
    e.add_argument("--shard", type=count_int, default=0, help="this job's index in a job array (0-based)")
    e.add_argument(
        "--num-shards", type=positive_int, default=1, help="jobs in the job array: shards are dealt round-robin"
    )
    e.add_argument("--batch-size", type=count_int, default=0, help="teacher batch size (default: train.batch_size)")
    e.add_argument("overrides", nargs="*", help="key=value overrides, e.g. latent.num_latents=24")
    e.set_defaults(func=cmd_extract)
