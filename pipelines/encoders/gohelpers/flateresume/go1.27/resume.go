// DupHunter addition to a build-time copy of compress/flate (Go >= 1.27 internals).
// build.sh copies $GOROOT/src/compress/flate of the pinned toolchain next to this
// file; nothing else of the package is changed.

package flate

import "io"

// NewResumeWriter returns a Writer in the state the compressor had at a deflate block
// boundary `offset` bytes into the stream, given `history`, the input before the
// boundary, and `next`, the input after it; the output starts with `align` zero bits
// (the boundary's place in its byte: stored blocks pad to a byte of the whole stream,
// the caller drops them). The caller proves the result: a state this cannot rebuild
// shows as other bits.
//
//   - levels 1-6 (table-based fast encoders working on 64 KiB chunks): whole chunks of
//     history are encoded again, output dropped, to rebuild the tables (history must
//     end on a chunk boundary);
//   - levels 7-9 (lazy matching): the window as the compressor held it and the hash
//     chains of every position in it, the last three needing the bytes after (the
//     literal-cost estimates these levels also keep are not rebuilt);
//   - levels 0 and -2 keep no match state.
func NewResumeWriter(w io.Writer, level, align, offset int, history, next []byte) (*Writer, error) {
	zw, err := NewWriter(w, level)
	if err != nil {
		return zw, err
	}
	d := &zw.d
	d.w.nbits = uint8(align)
	if len(history) == 0 {
		return zw, nil
	}
	switch {
	case d.fast != nil:
		for len(history) >= maxStoreBlockSize {
			d.fast.encode(&d.tokens, history[:maxStoreBlockSize])
			d.tokens.Reset()
			history = history[maxStoreBlockSize:]
		}
	case d.state != nil:
		s := d.state
		index := min(windowIndex(offset), len(history))
		copy(d.window, history[len(history)-index:])
		for p := 0; p+minMatchLength <= index; p++ {
			insertHash(s, int32(p), d.window[p:p+minMatchLength])
		}
		d.windowEnd, s.index, d.blockStart = int32(index), int32(index), int32(index)
		for p := max(index-(minMatchLength-1), 0); p < index; p++ {
			// The hash needs minMatchLength bytes: a copy of the whole of next, three
			// times over, cost a segment more page faults than its input.
			ahead := next[:min(len(next), minMatchLength)]
			if b := append(append([]byte{}, d.window[p:index]...), ahead...); len(b) >= minMatchLength {
				insertHash(s, int32(p), b[:minMatchLength])
			}
		}
	}
	return zw, nil
}

// windowIndex is where the compressor keeps stream position `offset` in its window. The
// window slides by windowSize when processing stops at the first token at or past
// 2*windowSize-(minMatchLength+maxMatchLength); which token that was is not known
// here, so a boundary less than a match length past that point is a guess.
func windowIndex(offset int) int {
	const slideAt = 2*windowSize - (minMatchLength + maxMatchLength) + maxMatchLength/2
	for offset > slideAt {
		offset -= windowSize
	}
	return offset
}

func insertHash(s *advancedState, p int32, b []byte) {
	h := hash4(b)
	s.hashPrev[p&windowMask] = s.hashHead[h]
	s.hashHead[h] = p + s.hashOffset
}
