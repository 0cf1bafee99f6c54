// Command gzip-go compresses stdin with the Go standard library's compress/flate
// (the encoder inside compress/gzip) and writes the result to stdout.
//
// It has no dependencies beyond the standard library, so the Go toolchain that
// builds it fixes its output: DupHunter builds it once per Go generation whose
// deflate output differs (<= 1.26 and >= 1.27).
//
//	-mode deflate  raw deflate body, exactly as compress/gzip embeds it (default)
//	-mode prefix   raw deflate body emitted so far, without closing the stream: a
//	               prefix of the body that the full input would produce
//	-mode gzip     a complete gzip stream as compress/gzip.Writer writes it
//	-mode segment  one segment of the deflate body, resumed at a block boundary: stdin
//	               holds -history bytes of input before the boundary, then the input
//	               from the boundary on; the output is the body's bits from the boundary,
//	               closed (-final) or sync-flushed (the caller keeps the bits it needs),
//	               after -align zero bits (where the boundary is in its byte); -offset
//	               is the boundary's place in the input
//	-describe      print the Go version the helper was built with
//
// Segments use resumeflate, a copy of the toolchain's own compress/flate made by
// build.sh with one added file (flateresume/<generation>/resume.go).
package main

import (
	"bufio"
	"bytes"
	"compress/flate"
	"compress/gzip"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"
	"syscall"

	resumeflate "duphunter/gzipgo/resumeflate"
)

const bufSize = 256 << 10

func main() {
	level := flag.Int("level", flate.DefaultCompression, "compression level (-2..9)")
	mode := flag.String("mode", "deflate", "deflate | prefix | gzip | segment")
	history := flag.Int("history", 0, "segment: bytes of input before the boundary")
	align := flag.Int("align", 0, "segment: the boundary's bit position in its byte (0-7)")
	offset := flag.Int("offset", 0, "segment: the boundary's offset in the input stream")
	final := flag.Bool("final", false, "segment: the last one, close the stream")
	size := flag.Int("size", 0, "segment: bytes of stdin, read into one buffer (grown if more come)")
	describe := flag.Bool("describe", false, "print the Go version and exit")
	flag.Parse()
	if *describe {
		fmt.Println(runtime.Version())
		return
	}
	var err error
	if *mode == "segment" {
		err = segment(*level, *history, *align, *offset, *final, *size)
	} else {
		err = run(*level, *mode)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "gzip-go:", err)
		os.Exit(1)
	}
}

func run(level int, mode string) error {
	out := bufio.NewWriterSize(os.Stdout, bufSize)
	in := bufio.NewReaderSize(os.Stdin, bufSize)
	var w io.WriteCloser
	var err error
	switch mode {
	case "deflate", "prefix":
		w, err = flate.NewWriter(out, level)
	case "gzip":
		w, err = gzip.NewWriterLevel(out, level)
	default:
		err = fmt.Errorf("unknown mode %q", mode)
	}
	if err != nil {
		return err
	}
	if _, err := io.Copy(w, in); err != nil {
		return err
	}
	if mode != "prefix" {
		if err := w.Close(); err != nil {
			return err
		}
	}
	return out.Flush()
}

func segment(level, historyLen, align, offset int, final bool, size int) error {
	input, err := readInput(size)
	if err != nil {
		return err
	}
	if historyLen > len(input) {
		return fmt.Errorf("history of %d bytes, input of %d", historyLen, len(input))
	}
	history, rest := input[:historyLen], input[historyLen:]
	out := bufio.NewWriterSize(os.Stdout, bufSize)
	w, err := resumeflate.NewResumeWriter(out, level, align, offset, history, rest)
	if err != nil {
		return err
	}
	if _, err := w.Write(rest); err != nil {
		return err
	}
	if final {
		err = w.Close()
	} else {
		err = w.Flush()
	}
	if err != nil {
		return err
	}
	return out.Flush()
}

// readInput returns the whole of stdin, announced as `size` bytes. A regular file (the
// memory file a restore writes the segment's input to) is mapped, not copied. A pipe is
// read into one buffer of that size: io.ReadAll grows its buffer by copying as the input
// comes, and with the collector off (as segment helpers run: they live for one segment)
// every copy's pages are new to the process: about three times the input in page
// faults, measured as 20 ms of system time per 5.5 MB segment.
func readInput(size int) ([]byte, error) {
	info, err := os.Stdin.Stat()
	if err == nil && info.Mode().IsRegular() && size > 0 && info.Size() == int64(size) {
		return syscall.Mmap(int(os.Stdin.Fd()), 0, size, syscall.PROT_READ, syscall.MAP_PRIVATE)
	}
	input := bytes.NewBuffer(make([]byte, 0, size+bytes.MinRead))
	_, err = input.ReadFrom(os.Stdin)
	return input.Bytes(), err
}
