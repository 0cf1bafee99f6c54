"""The pull path: a blob GET served intact, from the layer buffer or restored from its
recipe and packs (restore, checkpoints), the restore work predicted ahead of the pulls
(predict, popularity), and the check that a layer restores from its packs alone.

May import encoders, store, formats and the shared modules; never registry or ingest.
"""
