"""Pure byte formats, no I/O but the streams given to them: compressed-stream sniffing
and decoding (codecs), digests, the tar split, recipes and segment verification.

May import only the shared modules (config, errors); nothing else of pipelines.
"""
