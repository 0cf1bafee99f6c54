"""The registry's metadata and policy: the `Registry` facade the API and workers call
(facade.py), manifests and tags, garbage collection, retention, authentication and
login throttling, storage accounting and job marks.

The top layer: it may import every other package of pipelines (ingest, serve, encoders,
store, formats) and the shared modules (config, errors, pauses, metrics).
"""
