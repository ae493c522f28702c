"""Implementations in the verifier's calling convention: the public name of
`refattn.verify.adapters` (``refattn verify refattn.adapters:cpu``)."""

from .verify.adapters import cpu, cuda, dense, flex, sdpa, sparse, tiled

__all__ = ["cpu", "cuda", "dense", "flex", "sdpa", "sparse", "tiled"]
