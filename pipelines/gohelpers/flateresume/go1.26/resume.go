// DupHunter addition to a build-time copy of compress/flate (Go <= 1.26 internals).
// build.sh copies $GOROOT/src/compress/flate of the pinned toolchain next to this
// file; nothing else of the package is changed.

package flate

import "io"

// NewResumeWriter returns a Writer in the state the compressor had at a deflate block
// boundary, given `history`, the input before the boundary, and `next`, the input after
// it. The caller proves the result: a state this cannot rebuild shows as other bits.
//
//   - levels 4-9 (lazy matching, every position hashed): the window and hash chains
//     are a function of the last 32 KiB, plus the hashes of the last three positions,
//     which need the first bytes after the boundary;
//   - level 1 (BestSpeed): whole 64 KiB chunks of history are encoded again, output
//     dropped, to rebuild the match table of the previous chunk (history must end on
//     a chunk boundary, a multiple of 65535 bytes into the stream);
//   - levels 2-3 skip hashing inside matches: priming the window is only a guess;
//   - levels 0 and -2 keep no state across blocks.
func NewResumeWriter(w io.Writer, level int, history, next []byte) (*Writer, error) {
	zw, err := NewWriter(w, level)
	if err != nil || len(history) == 0 {
		return zw, err
	}
	d := &zw.d
	switch {
	case d.bestSpeed != nil:
		for len(history) >= maxStoreBlockSize {
			d.tokens = d.bestSpeed.encode(d.tokens[:0], history[:maxStoreBlockSize])
			history = history[maxStoreBlockSize:]
		}
		d.tokens = d.tokens[:0]
	case d.compressionLevel.level >= 2:
		if len(history) > windowSize {
			history = history[len(history)-windowSize:]
		}
		d.fillWindow(history)
		d.blockStart = d.windowEnd
		if d.fastSkipHashing == skipNever {
			hashTail(d, next)
		}
	}
	return zw, nil
}

// hashTail inserts the positions that fillWindow leaves out (their four bytes run past
// the window) in the order the compressor inserted them.
func hashTail(d *compressor, next []byte) {
	n := d.windowEnd
	for p := n - (minMatchLength - 1); p < n; p++ {
		if p < 0 {
			continue
		}
		b := make([]byte, 0, 2*minMatchLength)
		b = append(append(b, d.window[p:n]...), next...)
		if len(b) < minMatchLength {
			continue
		}
		hh := &d.hashHead[hash4(b[:minMatchLength])&hashMask]
		d.hashPrev[p&windowMask] = *hh
		*hh = uint32(p + d.hashOffset)
	}
}
