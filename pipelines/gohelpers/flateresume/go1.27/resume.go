// DupHunter addition to a build-time copy of compress/flate (Go >= 1.27 internals).
// build.sh copies $GOROOT/src/compress/flate of the pinned toolchain next to this
// file; nothing else of the package is changed.

package flate

import "io"

// NewResumeWriter returns a Writer in the state the compressor had at a deflate block
// boundary, given `history`, the input before the boundary, and `next`, the input after
// it. The caller proves the result: a state this cannot rebuild shows as other bits.
//
//   - levels 1-6 (table-based fast encoders working on 64 KiB chunks): whole chunks of
//     history are encoded again, output dropped, to rebuild the tables (history must
//     end on a chunk boundary, a multiple of 65535 bytes into the stream);
//   - levels 7-9 (lazy matching): the window and hash chains of the last 32 KiB, plus
//     the hashes of the last three positions, which need the bytes after the boundary;
//   - levels 0 and -2 keep no match state.
func NewResumeWriter(w io.Writer, level int, history, next []byte) (*Writer, error) {
	zw, err := NewWriter(w, level)
	if err != nil || len(history) == 0 {
		return zw, err
	}
	d := &zw.d
	switch {
	case d.fast != nil:
		for len(history) >= maxStoreBlockSize {
			d.fast.encode(&d.tokens, history[:maxStoreBlockSize])
			d.tokens.Reset()
			history = history[maxStoreBlockSize:]
		}
	case d.state != nil:
		if len(history) > windowSize {
			history = history[len(history)-windowSize:]
		}
		d.fillWindow(history)
		hashTail(d, next)
	}
	return zw, nil
}

// hashTail inserts the positions that fillWindow leaves out (their four bytes run past
// the window) in the order the compressor inserted them.
func hashTail(d *compressor, next []byte) {
	s := d.state
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
		h := hash4(b[:minMatchLength])
		s.hashPrev[p&windowMask] = s.hashHead[h]
		s.hashHead[h] = p + s.hashOffset
	}
}
