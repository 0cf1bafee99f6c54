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
//	-mode serve    segments, one after another, requested over stdin (a Unix socket;
//	               package segmentio): the process stays up for many
//	-describe      print the Go version the helper was built with
//
// Segments use resumeflate, a copy of the toolchain's own compress/flate made by
// build.sh with one added file (flateresume/<generation>/resume.go).
package main

import (
	"bufio"
	"compress/flate"
	"compress/gzip"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"

	resumeflate "duphunter/gzipgo/resumeflate"
	"duphunter/gzipgo/segmentio"
)

const bufSize = 256 << 10

type options struct {
	level, history, align, offset, size int
	mode                                string
	final, describe                     bool
}

func parse(args []string, onError flag.ErrorHandling) (options, error) {
	var o options
	flags := flag.NewFlagSet("gzip-go", onError)
	if onError == flag.ContinueOnError {
		flags.SetOutput(io.Discard) // a served request's error goes back in its reply
	}
	flags.IntVar(&o.level, "level", flate.DefaultCompression, "compression level (-2..9)")
	flags.StringVar(&o.mode, "mode", "deflate", "deflate | prefix | gzip | segment | serve")
	flags.IntVar(&o.history, "history", 0, "segment: bytes of input before the boundary")
	flags.IntVar(&o.align, "align", 0, "segment: the boundary's bit position in its byte (0-7)")
	flags.IntVar(&o.offset, "offset", 0, "segment: the boundary's offset in the input stream")
	flags.BoolVar(&o.final, "final", false, "segment: the last one, close the stream")
	flags.IntVar(&o.size, "size", 0, "segment: bytes of stdin, read into one buffer (grown if more come)")
	flags.BoolVar(&o.describe, "describe", false, "print the Go version and exit")
	return o, flags.Parse(args)
}

func main() {
	o, _ := parse(os.Args[1:], flag.ExitOnError)
	if o.describe {
		fmt.Println(runtime.Version())
		return
	}
	var err error
	switch o.mode {
	case "segment", "serve":
		err = segmentio.Run(o.mode, o.size, os.Args[1:], encodeSegment)
	default:
		err = run(o.level, o.mode)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "gzip-go:", err)
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

func segment(o options, input []byte, output io.Writer) error {
	if o.history > len(input) {
		return fmt.Errorf("history of %d bytes, input of %d", o.history, len(input))
	}
	history, rest := input[:o.history], input[o.history:]
	out := bufio.NewWriterSize(output, bufSize)
	w, err := resumeflate.NewResumeWriter(out, o.level, o.align, o.offset, history, rest)
	if err != nil {
		return err
	}
	if _, err := w.Write(rest); err != nil {
		return err
	}
	if o.final {
		err = w.Close()
	} else {
		err = w.Flush()
	}
	if err != nil {
		return err
	}
	return out.Flush()
}
