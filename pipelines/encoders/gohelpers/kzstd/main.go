// Command zstd-klauspost compresses stdin with github.com/klauspost/compress/zstd as
// containers/image (skopeo, podman, buildah) uses it for zstd layers, built against
// the Debian package golang-github-klauspost-compress-dev.
//
// containers/image makes its writer with zstd.NewWriter(dest) or, given a
// compression level, zstd.NewWriter(dest, zstd.WithEncoderLevel(
// zstd.EncoderLevelFromZstd(level))); everything else is the library default, so
// the output depends on the encoder level (fastest, default, better, best), the
// checksum option and on how the input was written: containers/image writes the 8
// bytes it sniffed first (-first 8), which become a block of their own. Concurrency
// (GOMAXPROCS by default) switches between synchronous (1) and asynchronous block
// encoding (more); measured on this library version, both write the same bytes
// (tests/encoders/test_encoders.py), so no id names it.
//
//	-mode frame    the whole zstd frame, as the producer writes it
//	-mode prefix   the frame header and the blocks of the whole input blocks of stdin
//	               (none of them last), flushed: a prefix of the frame any input
//	               starting with these bytes compresses to
//	-describe      print the library version baked in at build time
package main

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"

	"github.com/klauspost/compress/zstd"
)

const bufSize = 256 << 10

// Set with -ldflags -X by build.sh from dpkg.
var compressVersion = "unknown"

func main() {
	speed := flag.String("speed", "default", "encoder level: fastest | default | better | best")
	concurrency := flag.Int("concurrency", 2, "encoder concurrency (1: synchronous)")
	crc := flag.Bool("crc", true, "write the frame checksum")
	first := flag.Int("first", 0, "bytes written before the rest is copied (0: none)")
	mode := flag.String("mode", "frame", "frame | prefix")
	describe := flag.Bool("describe", false, "print the library version and exit")
	flag.Parse()
	if *describe {
		fmt.Printf("klauspost-deb-%s %s\n", compressVersion, runtime.Version())
		return
	}
	if err := run(*speed, *concurrency, *crc, *first, *mode); err != nil {
		fmt.Fprintln(os.Stderr, "zstd-klauspost:", err)
		os.Exit(1)
	}
}

func run(speed string, concurrency int, crc bool, first int, mode string) error {
	ok, level := zstd.EncoderLevelFromString(speed)
	if !ok {
		return fmt.Errorf("unknown encoder level %q", speed)
	}
	if mode != "frame" && mode != "prefix" {
		return fmt.Errorf("unknown mode %q", mode)
	}
	out := bufio.NewWriterSize(os.Stdout, bufSize)
	zw, err := zstd.NewWriter(out, zstd.WithEncoderLevel(level),
		zstd.WithEncoderConcurrency(concurrency), zstd.WithEncoderCRC(crc))
	if err != nil {
		return err
	}
	input := bufio.NewReaderSize(os.Stdin, bufSize)
	if first > 0 {
		// containers/image sniffs the first 8 bytes and hands the compressor
		// io.MultiReader(bytes.NewReader(them), rest): io.Copy writes them with Write,
		// then ReadFrom flushes them as a block of their own before the rest.
		head := make([]byte, first)
		n, err := io.ReadFull(input, head)
		if err != nil && err != io.ErrUnexpectedEOF && err != io.EOF {
			return err
		}
		if _, err := zw.Write(head[:n]); err != nil {
			return err
		}
		if n > 0 {
			if err := zw.Flush(); err != nil {
				return err
			}
		}
	}
	if mode == "prefix" {
		err = writePrefix(zw, input, blockSize(level))
	} else {
		_, err = zw.ReadFrom(input)
		if err == nil {
			err = zw.Close()
		}
	}
	if err != nil {
		return err
	}
	return out.Flush()
}

// blockSize is the library's input block size for a level (encoder_options.go:
// 64 KiB for SpeedFastest, else maxCompressedBlockSize, 128 KiB).
func blockSize(level zstd.EncoderLevel) int {
	if level == zstd.SpeedFastest {
		return 64 << 10
	}
	return 128 << 10
}

// writePrefix writes only the whole blocks of the input: the encoder compresses a
// block as soon as it is full, so Flush then has nothing partial to emit.
func writePrefix(zw *zstd.Encoder, input io.Reader, block int) error {
	data, err := io.ReadAll(input)
	if err != nil {
		return err
	}
	whole := len(data) / block * block
	if whole == 0 {
		return nil
	}
	if _, err := zw.Write(data[:whole]); err != nil {
		return err
	}
	return zw.Flush()
}
