"""Evaluation protocols, identical for every method: kNN, linear, semi-supervised,
cross-domain transfer, clustering (and per-layer probes)."""
