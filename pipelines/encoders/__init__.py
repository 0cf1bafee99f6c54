"""The compressors a layer is rebuilt with: the `Encoder` families (stock zlib, Go,
pgzip, GNU gzip and pigz, libzstd, klauspost, zstd:chunked, the zstd program, frames),
the encoder table, detection and proof, and the canaries; with the Go helpers
(gohelpers/) and the pinned programs (programs/) they run.

May import store, formats and the shared modules (it needs only formats); never registry,
ingest or serve. Inside: canaries > detect_frames > detect > table > the families > base.
"""
