"""kava: latent reasoning by compressed KV-cache distillation.

``kava.load(CHECKPOINT)`` gives a :class:`kava.LatentReasoner` that answers questions in
latent, CoT or no-CoT mode (:mod:`kava.evaluation.inference`). Both are looked up on first
use, so ``import kava`` loads no torch.
"""

__version__ = "0.1.0"

# The public inference API, re-exported lazily from the evaluation layer.
_API = {
    "load": "kava.evaluation.inference",
    "LatentReasoner": "kava.evaluation.inference",
    "Answer": "kava.evaluation.inference",
}


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'kava' has no attribute {name!r}")
