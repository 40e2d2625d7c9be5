"""Paired activation caches: collect once, train and rank from disk."""

from guardrail.activations.cache import ActivationCache, CacheError, CacheManifest, PairedActivations
from guardrail.activations.collect import SiteReader, SiteRows, TransformersReader, collect, site_reader

__all__ = ["ActivationCache", "CacheError", "CacheManifest", "PairedActivations", "SiteReader", "SiteRows", "TransformersReader", "collect", "site_reader"]
