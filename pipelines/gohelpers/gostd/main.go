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
//	-describe      print the Go version the helper was built with
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
)

const bufSize = 256 << 10

func main() {
	level := flag.Int("level", flate.DefaultCompression, "compression level (-2..9)")
	mode := flag.String("mode", "deflate", "deflate | prefix | gzip")
	describe := flag.Bool("describe", false, "print the Go version and exit")
	flag.Parse()
	if *describe {
		fmt.Println(runtime.Version())
		return
	}
	if err := run(*level, *mode); err != nil {
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
