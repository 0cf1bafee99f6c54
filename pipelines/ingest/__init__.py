"""The push path after a manifest: a layer blob classified, split into files and a
recipe, its encoder proven, then committed as deduplicated (ingestor.py).

May import serve (trial restores, checkpoints, the layer check), encoders, store,
formats and the shared modules; never registry.
"""
