// Package segmentio is how a segment helper takes its segments: one, its input on stdin
// and its output on stdout (-mode segment: ReadInput), or many, served one after
// another (-mode serve: Serve). Run picks by mode.
//
// Served, the helper answers requests on its stdin, a Unix SOCK_SEQPACKET socket, until
// the other end closes it (the Python process that started it exits or lets it go).
// A request is one message: the segment's arguments (the command-line flags of
// `-mode segment` but -size, separated by NUL bytes) with two file descriptors attached
// (SCM_RIGHTS): the input file (all of it is the segment's input: mapped, never changed)
// and the output file (written from offset 0). The reply is one message: "ok <cpu nanoseconds>" once the output is
// written and both files are closed here, or "error <message>". A crash closes the
// socket: the other end reads nothing and knows.
//
// Starting a Go helper costs 3-4 ms of CPU (runtime, page faults of the binary); a
// restore runs one segment per 4 MiB of tar. Serving many segments from one process
// removes that cost and lets each segment reuse the memory the last one freed.
package segmentio

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"runtime"
	"runtime/debug"
	"strings"
	"syscall"
	"time"
)

// Encode writes one segment's output for its arguments (the flags of `-mode segment`)
// and input.
type Encode func(args []string, input []byte, output io.Writer) error

// Run takes segments as `mode` says: "segment", one (its input `size` bytes on stdin,
// its arguments `args`), or "serve", many.
func Run(mode string, size int, args []string, encode Encode) error {
	if mode == "serve" {
		return Serve(encode)
	}
	input, err := ReadInput(size)
	if err != nil {
		return err
	}
	return encode(args, input, os.Stdout)
}

// ReadInput returns the whole of stdin, announced as `size` bytes. A regular file (the
// memory file a restore writes the segment's input to) is mapped, not copied. A pipe is
// read into one buffer of that size: io.ReadAll grows its buffer by copying as the input
// comes, and with the collector off (as segment helpers run) every copy's pages are new
// to the process: about three times the input in page faults, measured as 20 ms of
// system time per 5.5 MB segment.
func ReadInput(size int) ([]byte, error) {
	info, err := os.Stdin.Stat()
	if err == nil && info.Mode().IsRegular() && size > 0 && info.Size() == int64(size) {
		return mapped(os.Stdin, size)
	}
	input := bytes.NewBuffer(make([]byte, 0, size+bytes.MinRead))
	_, err = input.ReadFrom(os.Stdin)
	return input.Bytes(), err
}

const (
	maxArgsBytes = 64 << 10
	// Memory is handed back to the kernel after this long without a request.
	idleRelease = time.Second
)

// Serve answers requests on stdin until it closes; it returns the error that ended it,
// nil for a close.
func Serve(encode Encode) error {
	socket := int(os.Stdin.Fd())
	args := make([]byte, maxArgsBytes)
	rights := make([]byte, syscall.CmsgSpace(2*4))
	release := time.AfterFunc(time.Hour, debug.FreeOSMemory)
	for {
		n, rightsLen, _, _, err := syscall.Recvmsg(socket, args, rights, syscall.MSG_CMSG_CLOEXEC)
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 && rightsLen == 0 {
			return nil // the other end closed
		}
		release.Stop()
		reply := answer(encode, args[:n], rights[:rightsLen])
		if _, err := syscall.Write(socket, []byte(reply)); err != nil {
			return err
		}
		release.Reset(idleRelease)
	}
}

// answer runs one request and says how it went.
func answer(encode Encode, args []byte, rights []byte) string {
	before := cpuNanoseconds()
	files, err := attachedFiles(rights)
	if err == nil {
		err = encodeFiles(encode, splitArgs(args), files[0], files[1])
	}
	for _, file := range files {
		file.Close()
	}
	// Collected here, between segments, so that the next one reuses this one's memory
	// (the helper runs with the collector otherwise off).
	runtime.GC()
	if err != nil {
		return "error " + err.Error()
	}
	return fmt.Sprintf("ok %d", cpuNanoseconds()-before)
}

// encodeFiles encodes a served request's input file into its output file.
func encodeFiles(encode Encode, args []string, inputFile, outputFile *os.File) error {
	info, err := inputFile.Stat()
	if err != nil {
		return err
	}
	input := []byte{}
	if size := int(info.Size()); size > 0 {
		input, err = mapped(inputFile, size)
		if err != nil {
			return err
		}
		defer syscall.Munmap(input)
	}
	return encode(args, input, outputFile)
}

// mapped is a file's first `size` bytes, mapped read-only: never copied.
func mapped(file *os.File, size int) ([]byte, error) {
	return syscall.Mmap(int(file.Fd()), 0, size, syscall.PROT_READ, syscall.MAP_PRIVATE)
}

func attachedFiles(rights []byte) ([]*os.File, error) {
	messages, err := syscall.ParseSocketControlMessage(rights)
	if err != nil {
		return nil, err
	}
	var fds []int
	for _, message := range messages {
		more, err := syscall.ParseUnixRights(&message)
		if err != nil {
			return nil, err
		}
		fds = append(fds, more...)
	}
	files := make([]*os.File, len(fds))
	for i, fd := range fds {
		files[i] = os.NewFile(uintptr(fd), "segment")
	}
	if len(files) != 2 {
		return files, fmt.Errorf("a request carries 2 files (input, output), not %d", len(files))
	}
	return files, nil
}

func splitArgs(args []byte) []string {
	if len(args) == 0 {
		return nil
	}
	return strings.Split(string(args), "\x00")
}

func cpuNanoseconds() int64 {
	var usage syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &usage); err != nil {
		return 0
	}
	return usage.Utime.Nano() + usage.Stime.Nano()
}
