// Command zstd-chunked writes stdin, a tar, as a zstd:chunked layer with
// github.com/containers/storage/pkg/chunked/compressor, the code containers/image
// (skopeo, podman, buildah) runs for --compression-format zstd:chunked, built against
// Debian's golang-github-containers-storage-dev and the libraries it uses
// (klauspost/compress, json-iterator, tar-split, go-digest).
//
// A zstd:chunked layer is a sequence of zstd frames (each file's payload in frames of
// its own, cut where a rolling checksum says) followed by two skippable frames: the
// zstd-compressed table of contents (JSON) and a footer locating it. All of it is a
// function of the tar and of the compression level (through zstd.EncoderLevelFromZstd).
//
// It writes the whole layer, as containers/image writes it. (Screening feeds it whole
// tar entries and an end of archive: all but the last frame are then the layer's own.)
//
//	-describe      print the library versions baked in at build time
package main

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"

	"github.com/containers/storage/pkg/chunked/compressor"
)

const bufSize = 256 << 10

// Set with -ldflags -X by build.sh from dpkg.
var (
	storageVersion  = "unknown"
	compressVersion = "unknown"
	jsoniterVersion = "unknown"
	tarsplitVersion = "unknown"
)

func main() {
	level := flag.Int("level", 10, "zstd compression level (containers/storage's default: 10)")
	describe := flag.Bool("describe", false, "print the library versions and exit")
	flag.Parse()
	if *describe {
		fmt.Printf("chunked-storage-deb-%s+compress-deb-%s+jsoniter-deb-%s+tarsplit-deb-%s %s\n",
			storageVersion, compressVersion, jsoniterVersion, tarsplitVersion, runtime.Version())
		return
	}
	if err := run(*level); err != nil {
		fmt.Fprintln(os.Stderr, "zstd-chunked:", err)
		os.Exit(1)
	}
}

func run(level int) error {
	out := bufio.NewWriterSize(os.Stdout, bufSize)
	metadata := map[string]string{} // the manifest annotations: not part of the blob
	zw, err := compressor.ZstdCompressor(out, metadata, &level)
	if err != nil {
		return err
	}
	_, err = io.Copy(zw, bufio.NewReaderSize(os.Stdin, bufSize))
	if closeErr := zw.Close(); err == nil {
		err = closeErr
	}
	if flushErr := out.Flush(); err == nil {
		err = flushErr
	}
	return err
}
