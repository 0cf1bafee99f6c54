// DupHunter addition to a build-time copy of compress/flate (Go <= 1.26 internals).
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
//   - levels 4-9 (lazy matching, every position hashed): the window as the compressor
//     held it (its slides decide which old positions are still reachable) and the
//     hash chains of every position in it, the last three needing the bytes after;
//   - level 1 (BestSpeed): whole 64 KiB chunks of history are encoded again, output
//     dropped, to rebuild the match table of the previous chunk (history must end on
//     a chunk boundary);
//   - levels 2-3 skip hashing inside matches: hashing every position is only a guess;
//   - levels 0 and -2 keep no state across blocks.
func NewResumeWriter(w io.Writer, level, align, offset int, history, next []byte) (*Writer, error) {
	zw, err := NewWriter(w, level)
	if err != nil {
		return zw, err
	}
	d := &zw.d
	d.w.nbits = uint(align)
	if len(history) == 0 {
		return zw, nil
	}
	switch {
	case d.bestSpeed != nil:
		for len(history) >= maxStoreBlockSize {
			d.tokens = d.bestSpeed.encode(d.tokens[:0], history[:maxStoreBlockSize])
			history = history[maxStoreBlockSize:]
		}
		d.tokens = d.tokens[:0]
	case d.compressionLevel.level >= 2:
		index := min(windowIndex(offset), len(history))
		copy(d.window, history[len(history)-index:])
		for p := 0; p+minMatchLength <= index; p++ {
			insertHash(d, p, d.window[p:p+minMatchLength])
		}
		d.windowEnd, d.index, d.blockStart = index, index, index
		for p := max(index-(minMatchLength-1), 0); p < index; p++ {
			// The hash needs minMatchLength bytes: a copy of the whole of next, three
			// times over, cost a segment more page faults than its input.
			ahead := next[:min(len(next), minMatchLength)]
			if b := append(append([]byte{}, d.window[p:index]...), ahead...); len(b) >= minMatchLength {
				insertHash(d, p, b[:minMatchLength])
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

func insertHash(d *compressor, p int, b []byte) {
	hh := &d.hashHead[hash4(b)&hashMask]
	d.hashPrev[p&windowMask] = *hh
	*hh = uint32(p + d.hashOffset)
}

func max(a, b int) int {
	if a > b {
		return a
	}
	return b
}

func min(a, b int) int {
	if a < b {
		return a
	}
	return b
}
