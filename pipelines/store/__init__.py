"""Where bytes and their bookkeeping live: the object store (S3), the file store and its
packs, blob descriptors, the Redis index, leases and the deletion protocol's notices.

May import formats and the shared modules; never encoders or anything above.
"""
