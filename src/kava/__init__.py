"""kava: latent reasoning by compressed KV-cache distillation."""

__version__ = "0.1.0"
