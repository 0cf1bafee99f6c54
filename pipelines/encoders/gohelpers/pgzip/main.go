// Command gzip-pgzip compresses stdin with github.com/klauspost/pgzip as
// containers/image (skopeo, podman, buildah) and umoci use it, built against the
// Debian packages golang-github-klauspost-pgzip-dev and -compress-dev.
//
// pgzip compresses fixed-size blocks independently (each primed with the previous
// block's 16 KiB tail) and ends each block with a sync flush, so its output
// depends on the level and the block size but not on the number of workers.
//
//	-mode deflate  the deflate body only: pgzip's gzip header and trailer stripped
//	-mode gzip     the complete gzip stream as pgzip writes it (ModTime unset)
//	-mode segment  the deflate body of whole pgzip blocks from a block boundary on: stdin
//	               holds the previous block's tail (-history bytes, 0 at the start of
//	               the stream), then the blocks; each block is compressed as pgzip
//	               compresses it (klauspost flate primed with that tail, sync-flushed),
//	               and -final closes the stream after the last one
//	-mode serve    segments, one after another, requested over stdin (a Unix socket;
//	               package segmentio): the process stays up for many
//	-describe      print the library versions baked in at build time
package main

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"

	"github.com/klauspost/compress/flate"
	"github.com/klauspost/pgzip"

	"duphunter/gzipgo/segmentio"
)

const (
	bufSize       = 256 << 10
	gzipHeaderLen = 10 // pgzip header without name, comment or extra
	gzipTrailer   = 8
	tailSize      = 16384 // pgzip primes each block with this much of the previous one
)

// Set with -ldflags -X by build.sh from dpkg.
var (
	pgzipVersion    = "unknown"
	compressVersion = "unknown"
)

type options struct {
	level, blockSize, history, size int
	mode                            string
	final, describe                 bool
}

func parse(args []string, onError flag.ErrorHandling) (options, error) {
	var o options
	flags := flag.NewFlagSet("gzip-pgzip", onError)
	if onError == flag.ContinueOnError {
		flags.SetOutput(io.Discard) // a served request's error goes back in its reply
	}
	flags.IntVar(&o.level, "level", pgzip.DefaultCompression, "compression level (-2..9)")
	flags.IntVar(&o.blockSize, "blocksize", 1<<20, "pgzip block size in bytes")
	flags.StringVar(&o.mode, "mode", "deflate", "deflate | gzip | segment | serve")
	flags.IntVar(&o.history, "history", 0, "segment: bytes of the previous block's tail")
	flags.BoolVar(&o.final, "final", false, "segment: the last one, close the stream")
	flags.IntVar(&o.size, "size", 0, "segment: bytes of stdin, read into one buffer (grown if more come)")
	flags.BoolVar(&o.describe, "describe", false, "print library versions and exit")
	return o, flags.Parse(args)
}

func main() {
	o, _ := parse(os.Args[1:], flag.ExitOnError)
	if o.describe {
		fmt.Printf("pgzip-deb-%s+compress-deb-%s %s\n", pgzipVersion, compressVersion, runtime.Version())
		return
	}
	var err error
	switch o.mode {
	case "segment", "serve":
		err = segmentio.Run(o.mode, o.size, os.Args[1:], encodeSegment)
	default:
		err = run(o.level, o.blockSize, o.mode)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "gzip-pgzip:", err)
		os.Exit(1)
	}
}

// encodeSegment encodes one segment as its flags say (the command line's, or a served
// request's).
func encodeSegment(args []string, input []byte, output io.Writer) error {
	o, err := parse(args, flag.ContinueOnError)
	if err != nil {
		return err
	}
	return segment(o, input, output)
}

func run(level, blockSize int, mode string) error {
	out := bufio.NewWriterSize(os.Stdout, bufSize)
	var sink io.Writer = out
	body := &bodyWriter{w: out, skip: gzipHeaderLen}
	switch mode {
	case "deflate":
		sink = body
	case "gzip":
	default:
		return fmt.Errorf("unknown mode %q", mode)
	}
	zw, err := pgzip.NewWriterLevel(sink, level)
	if err != nil {
		return err
	}
	// Two blocks per core in flight, not pgzip's default of one: with one, a core waits
	// whenever the oldest block is being written out or the input comes slowly (a
	// restore's rebuild feeds it). The output is the same: each block is compressed
	// alone, primed with the input before it.
	if err := zw.SetConcurrency(blockSize, 2*runtime.GOMAXPROCS(0)); err != nil {
		return err
	}
	if _, err := io.Copy(zw, bufio.NewReaderSize(os.Stdin, bufSize)); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return err
	}
	return out.Flush()
}

// bodyWriter drops the first `skip` bytes and holds back the last 8 (the gzip
// trailer), passing everything in between through.
type bodyWriter struct {
	w    io.Writer
	skip int
	held []byte
}

func (b *bodyWriter) Write(p []byte) (int, error) {
	n := len(p)
	if b.skip > 0 {
		drop := min(b.skip, len(p))
		b.skip -= drop
		p = p[drop:]
	}
	b.held = append(b.held, p...)
	if release := len(b.held) - gzipTrailer; release > 0 {
		if _, err := b.w.Write(b.held[:release]); err != nil {
			return 0, err
		}
		b.held = append(b.held[:0], b.held[release:]...)
	}
	return n, nil
}

func min(a, b int) int {
	if a < b {
		return a
	}
	return b
}

// segment compresses whole blocks the way pgzip's compressBlock does: one flate writer,
// ResetDict with the previous block's tail (none for a block of at most tailSize
// bytes), Write, Flush; the stream's last block (possibly empty) is also closed.
func segment(o options, input []byte, output io.Writer) error {
	if o.history > len(input) {
		return fmt.Errorf("history of %d bytes, input of %d", o.history, len(input))
	}
	var tail []byte
	if o.history > 0 {
		tail = input[:o.history]
	}
	data := input[o.history:]
	out := bufio.NewWriterSize(output, bufSize)
	fw, err := flate.NewWriterDict(out, o.level, nil)
	if err != nil {
		return err
	}
	for {
		n := min(o.blockSize, len(data))
		last := o.final && n < o.blockSize
		if n == 0 && !last {
			break
		}
		block := data[:n]
		data = data[n:]
		fw.ResetDict(out, tail)
		if _, err := fw.Write(block); err != nil {
			return err
		}
		if err := fw.Flush(); err != nil {
			return err
		}
		if last {
			if err := fw.Close(); err != nil {
				return err
			}
			break
		}
		tail = nil
		if len(block) > tailSize {
			tail = block[len(block)-tailSize:]
		}
	}
	return out.Flush()
}
