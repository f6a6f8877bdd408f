"""Moved to :mod:`kava.model.latent`; this module re-exports it."""

from .model.latent import LatentState, cache_span, crop_cache, final_pass, positions, run_latents  # noqa: F401
