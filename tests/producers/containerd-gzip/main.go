// Command containerd-gzip writes a container image layer of a directory the way
// containerd and BuildKit write a new layer, as a producer for DupHunter's tests that
// shares no code with DupHunter's encoder helpers (pipelines/encoders/gohelpers):
//
//   - the tar comes from archive/tar, one tar.FileInfoHeader per entry in
//     filepath walk order, PAX format (records only where a name, link or size needs
//     them), whole-second modification times, no access or change times,
//     directories with a trailing slash, hard links after the first as TypeLink,
//     sockets skipped (containerd's archive.WriteDiff, against an empty lower layer);
//   - the tar is compressed by compress/gzip at gzip.DefaultCompression with a zero
//     gzip header, as containerd's compression.CompressStream and BuildKit's gzip
//     compressor do by default.
//
// The output depends only on the directory and on the Go toolchain that built this
// program: its compress/flate fixes the deflate stream.
//
//	containerd-gzip [-o layer.tar.gz] [-level N] DIRECTORY
//	containerd-gzip -version     print the Go version the program was built with
package main

import (
	"archive/tar"
	"bufio"
	"compress/gzip"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"time"
)

func main() {
	output := flag.String("o", "-", "where to write the compressed layer (- is stdout)")
	level := flag.Int("level", gzip.DefaultCompression, "gzip level (-2..9)")
	version := flag.Bool("version", false, "print the Go version and exit")
	flag.Parse()
	if *version {
		fmt.Println(runtime.Version())
		return
	}
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: containerd-gzip [-o FILE] [-level N] DIRECTORY")
		os.Exit(2)
	}
	if err := writeLayerTo(*output, flag.Arg(0), *level); err != nil {
		fmt.Fprintln(os.Stderr, "containerd-gzip:", err)
		os.Exit(1)
	}
}

func writeLayerTo(output, root string, level int) error {
	if output == "-" {
		return writeLayer(os.Stdout, root, level)
	}
	file, err := os.Create(output)
	if err != nil {
		return err
	}
	if err := writeLayer(file, root, level); err != nil {
		file.Close()
		return err
	}
	return file.Close()
}

// writeLayer streams tar -> gzip -> buffer -> out, like containerd's walking differ.
func writeLayer(out io.Writer, root string, level int) error {
	buffered := bufio.NewWriterSize(out, 128<<10)
	compressed, err := gzip.NewWriterLevel(buffered, level)
	if err != nil {
		return err
	}
	layer := &layerWriter{root: root, tw: tar.NewWriter(compressed), firstLinks: map[inode]string{}}
	if err := filepath.WalkDir(root, layer.add); err != nil {
		return err
	}
	if err := layer.tw.Close(); err != nil {
		return err
	}
	if err := compressed.Close(); err != nil {
		return err
	}
	return buffered.Flush()
}

type inode struct{ device, number uint64 }

type layerWriter struct {
	root       string
	tw         *tar.Writer
	firstLinks map[inode]string // hard-linked inode -> the name it was first written as
}

func (l *layerWriter) add(path string, entry fs.DirEntry, walkErr error) error {
	if walkErr != nil {
		return walkErr
	}
	if path == l.root {
		return nil
	}
	info, err := entry.Info() // lstat: a symlink is written as a symlink
	if err != nil {
		return err
	}
	if info.Mode()&fs.ModeSocket != 0 {
		return nil
	}
	hdr, err := l.header(path, info)
	if err != nil {
		return err
	}
	if err := l.tw.WriteHeader(hdr); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if hdr.Typeflag != tar.TypeReg || hdr.Size == 0 {
		return nil
	}
	return l.copyContent(path, hdr.Size)
}

func (l *layerWriter) header(path string, info fs.FileInfo) (*tar.Header, error) {
	link := ""
	if info.Mode()&fs.ModeSymlink != 0 {
		var err error
		if link, err = os.Readlink(path); err != nil {
			return nil, err
		}
	}
	hdr, err := tar.FileInfoHeader(info, link)
	if err != nil {
		return nil, err
	}
	relative, err := filepath.Rel(l.root, path)
	if err != nil {
		return nil, err
	}
	hdr.Name = filepath.ToSlash(relative)
	if info.IsDir() {
		hdr.Name += "/"
	}
	// Without an explicit PAX format the writer would round times instead of truncating.
	hdr.Format = tar.FormatPAX
	hdr.ModTime = hdr.ModTime.Truncate(time.Second)
	hdr.AccessTime = time.Time{}
	hdr.ChangeTime = time.Time{}
	if first, ok := l.earlierHardLink(hdr.Name, info); ok {
		hdr.Typeflag = tar.TypeLink
		hdr.Linkname = first
		hdr.Size = 0
	}
	return hdr, nil
}

// earlierHardLink returns the name a hard-linked file was first written under, and
// records name as that first name when there is none yet.
func (l *layerWriter) earlierHardLink(name string, info fs.FileInfo) (string, bool) {
	stat, ok := info.Sys().(*syscall.Stat_t)
	if !ok || info.IsDir() || stat.Nlink < 2 {
		return "", false
	}
	key := inode{uint64(stat.Dev), uint64(stat.Ino)}
	if first, seen := l.firstLinks[key]; seen {
		return first, true
	}
	l.firstLinks[key] = name
	return "", false
}

func (l *layerWriter) copyContent(path string, size int64) error {
	file, err := os.Open(path)
	if err != nil {
		return err
	}
	defer file.Close()
	copied, err := io.CopyBuffer(l.tw, file, make([]byte, 32<<10))
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if copied != size {
		return errors.New(path + ": file changed size while it was archived")
	}
	return nil
}
