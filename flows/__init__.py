"""Prefect flows, one per pipeline: thin, they read like the paper's method section."""

from flows.cache_activations import cache_activations

FLOWS = {"cache-activations": cache_activations}
