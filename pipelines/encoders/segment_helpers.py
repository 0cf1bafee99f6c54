"""How a Go helper encodes one segment (`run_segment_helper`): the segment's input in a
memory file (`SpareFiles` keeps them for the next segments), the output in another,
mapped, never copied, and the helper itself kept up for many segments (`ServedHelpers`).

A helper started per segment cost 3-4 ms of CPU (the Go runtime's start, the binary's page
faults) against 10-120 ms of encoding per segment. A served helper (`-mode serve`, Go
package gohelpers/segmentio) takes segment after segment over a Unix socket: the request
carries the segment's flags and, attached, its two memory files; the reply says it is
done and what CPU it took.
"""

from __future__ import annotations

import array
import contextlib
import mmap
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from pipelines.config import HOST_CORES
from pipelines.encoders.base import HelperFailedError, charge_cpu
from pipelines.formats import Pieces, total_length
from pipelines.pauses import pause

REPLY_BYTES = 64 << 10
# A helper left idle this long is let go (not reused) when the pool is next touched.
IDLE_SECONDS = 60.0


def segment_helper_env() -> dict[str, str]:
    """The environment of a Go segment helper: it holds one segment's input (a few MiB)
    at a time, and its collector, run again and again as the input grew, cost 40-70 ms
    of CPU per 5.5 MB segment against ~120 ms of encoding (measured with
    GODEBUG=gctrace=1). So it is off, with a ceiling should an input be huge; a served
    helper collects once after each segment, so that the next reuses its memory."""
    return {**os.environ, "GOGC": "off", "GOMEMLIMIT": "1GiB"}


def run_segment_helper(argv: Sequence[str], parts: Pieces) -> memoryview:
    """A Go segment helper's output for `parts` (history, data, ...), fed in order;
    `argv` is the helper's one-segment command line (`-mode segment` and its flags but
    `-size`: a served helper's input is a file of exactly the parts), run by a served
    helper of the same program. The view is writable: its edges are
    masked in place; the helper's file is not changed."""
    size = total_length(parts)
    with _input_file(parts, size) as given, _memory_file("output") as output:
        SERVED.encode(argv[0], argv[1:], given, output)
        return _mapped(output)


@dataclass(eq=False)
class _Helper:
    """One served helper: its process, our end of its socket, its stderr."""

    program: str
    process: subprocess.Popen[bytes]
    channel: socket.socket
    errors: BinaryIO
    last_used: float = field(default_factory=time.monotonic)

    @classmethod
    def start(cls, program: str) -> _Helper:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        errors = _memory_file("errors")
        try:
            process = subprocess.Popen(
                [program, "-mode", "serve"],
                stdin=theirs.fileno(),
                stdout=subprocess.DEVNULL,
                stderr=errors,
                env=segment_helper_env(),
            )
        except BaseException:
            ours.close()
            errors.close()
            raise
        finally:
            theirs.close()
        return cls(program, process, ours, errors)

    def send(self, args: Sequence[str], given: BinaryIO, output: BinaryIO) -> None:
        request = "\0".join(args).encode()
        files = array.array("i", [given.fileno(), output.fileno()])
        self.channel.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, files)])

    def reply(self) -> bytes:
        """The helper's answer to the request sent; b"" if it died meanwhile."""
        return self.channel.recv(REPLY_BYTES)

    def stop(self) -> None:
        """Close its socket (it exits on that) and reap it."""
        self.channel.close()
        self._reap()
        self.errors.close()

    def death(self) -> HelperFailedError:
        """The error a helper that died under a request leaves: its exit and stderr."""
        self.channel.close()
        returncode = self._reap()
        self.errors.seek(0)
        message = self.errors.read().decode("utf-8", "replace").strip()
        self.errors.close()
        return HelperFailedError(f"{self.program} (served) exited with {returncode}: {message}")

    def _reap(self) -> int:
        try:
            return self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


class ServedHelpers:
    """This process's served segment helpers, per program: a thread takes an idle one
    (or starts one), runs its segment, and gives it back. At most `keep` idle ones are
    kept per program; one idle for IDLE_SECONDS is let go. A helper that dies before
    it answers is replaced and the request asked once more; a second death fails the
    segment (HelperFailedError). A forked child starts its own: the parent's sockets
    are closed in it."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._idle: dict[str, list[_Helper]] = {}
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._forget_after_fork)

    def encode(self, program: str, args: Sequence[str], given: BinaryIO, output: BinaryIO) -> None:
        """Have a helper of `program` encode `given` into `output` as `args` say. A
        helper that dies before it answers (killed while idle, maybe a moment before the
        request: the kernel may still take it) is replaced and the request asked once
        more, of a new one; if that one dies too, the segment fails."""
        helper = self._take(program)
        answer = self._asked(helper, args, given, output)
        if not answer:
            helper.death()
            output.seek(0)  # what it wrote is dropped; the file's offset is shared
            output.truncate()
            helper = _Helper.start(program)
            answer = self._asked(helper, args, given, output)
            if not answer:
                raise helper.death()
        self._give_back(helper)
        status, _, detail = answer.decode("utf-8", "replace").partition(" ")
        if status != "ok":
            raise HelperFailedError(f"{program} (served) failed: {detail}")
        charge_cpu(int(detail) / 1e9)

    @staticmethod
    def _asked(helper: _Helper, args: Sequence[str], given: BinaryIO, output: BinaryIO) -> bytes:
        """The helper's reply to the request; b"" if it died before answering."""
        try:
            helper.send(args, given, output)
            pause("segment-helper-asked")
            return helper.reply()
        except (BrokenPipeError, ConnectionResetError, ConnectionRefusedError):
            return b""
        except BaseException:
            helper.stop()
            raise

    def processes(self) -> list[int]:
        """The process ids of the idle helpers kept."""
        with self._lock:
            return [helper.process.pid for idle in self._idle.values() for helper in idle]

    def forget(self) -> None:
        """Let every idle helper go."""
        with self._lock:
            helpers = [helper for idle in self._idle.values() for helper in idle]
            self._idle.clear()
        for helper in helpers:
            helper.stop()

    def _take(self, program: str) -> _Helper:
        with self._lock:
            idle = self._idle.setdefault(program, [])
            helper = idle.pop() if idle else None
        return helper or _Helper.start(program)

    def _give_back(self, helper: _Helper) -> None:
        """Keep it (the most recently used `keep` per program); let the rest go."""
        now = time.monotonic()
        helper.last_used = now
        with self._lock:
            idle = self._idle.setdefault(helper.program, [])
            idle.append(helper)
            fresh = [kept for kept in idle if now - kept.last_used <= IDLE_SECONDS]
            kept_ones = fresh[-self.keep :]
            let_go = [old for old in idle if old not in kept_ones]
            idle[:] = kept_ones
        for old in let_go:
            old.stop()

    def _forget_after_fork(self) -> None:
        self._lock = threading.Lock()
        for idle in self._idle.values():
            for helper in idle:
                helper.channel.close()
                helper.errors.close()
        self._idle = {}


def _memory_file(name: str) -> BinaryIO:
    """An anonymous file in memory (memfd), open for reading and writing."""
    return open(os.memfd_create(name, os.MFD_CLOEXEC), "w+b")


class SpareFiles:
    """Memory files kept for the next segments' inputs. A segment's input written into a
    new memory file costs the kernel a fresh page per 4 KiB, zeroed, then freed: 2.8 ms
    per 4 MiB against 0.6 into a file whose pages are there. At most `count` are kept
    (idle, what a process holds), each only while it is at most SPARE_FILE_BYTES. (The
    output's file is not kept: it is mapped and read until the segment is sent, and
    kept for that long, it was seldom free for the next one; no gain was measured.)"""

    def __init__(self, name: str, count: int) -> None:
        self.name, self.count = name, count
        self._kept: list[int] = []
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            if self._kept:
                return self._kept.pop()
        return os.memfd_create(self.name, os.MFD_CLOEXEC)

    def give_back(self, descriptor: int, size: int) -> None:
        """Keep the file for another segment, or close it."""
        with self._lock:
            if size <= SPARE_FILE_BYTES and len(self._kept) < self.count:
                self._kept.append(descriptor)
                return
        os.close(descriptor)

    def sizes(self) -> list[int]:
        with self._lock:
            return [os.fstat(descriptor).st_size for descriptor in self._kept]

    def forget(self) -> None:
        with self._lock:
            for descriptor in self._kept:
                os.close(descriptor)
            self._kept.clear()


SPARE_FILE_BYTES = 12 << 20
# a process runs at most one segment per core
SPARE_INPUTS = SpareFiles("input", HOST_CORES)
SERVED = ServedHelpers(keep=HOST_CORES)


@contextlib.contextmanager
def _input_file(parts: Pieces, size: int) -> Iterator[BinaryIO]:
    """A memory file holding exactly `parts`, at offset 0: a kept one if there is one."""
    descriptor = SPARE_INPUTS.take()
    try:
        os.ftruncate(descriptor, size)
        with open(descriptor, "w+b", closefd=False) as given:
            given.seek(0)
            for part in parts:
                given.write(part)
            given.flush()
            yield given
    except BaseException:
        os.close(descriptor)
        raise
    SPARE_INPUTS.give_back(descriptor, size)


def _mapped(file: BinaryIO) -> memoryview:
    """All a file holds, mapped copy-on-write: reading it costs no copy and, pages being
    mapped many at a time, few faults."""
    size = os.fstat(file.fileno()).st_size
    if not size:
        return memoryview(bytearray())
    return memoryview(mmap.mmap(file.fileno(), size, flags=mmap.MAP_PRIVATE))
