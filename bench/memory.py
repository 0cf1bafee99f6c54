"""`make bench-memory`: API memory stays flat while a 2 GiB blob streams in and out.

Starts Redis, S3 and the API (one gunicorn process, so its peak RSS is the figure),
pushes a 2 GiB blob in one streamed PATCH (as docker and skopeo do), pulls it back,
and prints the API process's peak resident memory (VmHWM) before and after.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import urllib3

from bench.report import git_state, machine, save_json, write_section
from deploy.stack import Stack, free_port

SIZE = 2 << 30
HEADING = "## bench-memory: a 2 GiB blob streams through flat memory"
CHUNK = 1 << 20


def pattern() -> Iterator[bytes]:
    """2 GiB of incompressible-looking bytes without holding them: a seeded chunk cycle."""
    seed = os.urandom(CHUNK)
    for number in range(SIZE // CHUNK):
        yield hashlib.sha256(number.to_bytes(8, "big")).digest() + seed[32:]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def api_worker_pid(stack: Stack) -> int:
    master = next(process.pid for name, process in stack.processes if name == "api")
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return int(children[0])


def main() -> None:
    with tempfile.TemporaryDirectory() as workdir, Stack(Path(workdir)) as stack:
        stack.env["DUPHUNTER_REDIS_URL"] = stack.start_redis(free_port())
        stack.env["DUPHUNTER_S3_ENDPOINT"] = stack.start_s3(
            free_port(10000), "duphunter", "duphunter-secret-key", "duphunter"
        )
        stack.env["DUPHUNTER_SPOOL_DIR"] = str(Path(workdir) / "spool")
        listen = f"127.0.0.1:{free_port()}"
        stack.start_api(listen, processes=1)
        pid = api_worker_pid(stack)
        http = urllib3.PoolManager(timeout=urllib3.Timeout(total=3600))
        base = f"http://{listen}/v2/bench/memory/blobs"
        idle = peak_rss_mib(pid)
        hasher = hashlib.sha256()

        def hashed() -> Iterator[bytes]:
            for chunk in pattern():
                hasher.update(chunk)
                yield chunk

        started = time.monotonic()
        location = http.request("POST", f"{base}/uploads/").headers["Location"]
        patch = http.request("PATCH", f"http://{listen}{location}", body=hashed(), chunked=True)
        digest = "sha256:" + hasher.hexdigest()
        done = http.request("PUT", f"http://{listen}{patch.headers['Location']}?digest={digest}")
        assert done.status == 201, done.data
        push_seconds = time.monotonic() - started
        after_push = peak_rss_mib(pid)
        started = time.monotonic()
        response = http.request("GET", f"{base}/{digest}", preload_content=False)
        pulled = hashlib.sha256()
        for chunk in response.stream(CHUNK):
            pulled.update(chunk)
        pull_seconds = time.monotonic() - started
        assert "sha256:" + pulled.hexdigest() == digest, "pulled bytes differ"
        after_pull = peak_rss_mib(pid)
        result = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "git": git_state(),
            "bytes": SIZE,
            "push_s": push_seconds,
            "pull_s": pull_seconds,
            "peak_rss_mib": {"idle": idle, "after_push": after_push, "after_pull": after_pull},
        }
        save_json("memory", result)
        report = (
            f"Run {result['date']} by `make bench-memory`, code at {result['git']}: "
            "one gunicorn API process, SeaweedFS S3 and Redis on loopback; a 2 GiB blob pushed "
            "in one streamed PATCH (chunked transfer encoding, as docker and skopeo send it), "
            "then pulled and re-hashed.\n\n"
            f"- push {push_seconds:.1f} s ({SIZE / push_seconds / 1e6:.0f} MB/s), "
            f"pull {pull_seconds:.1f} s ({SIZE / pull_seconds / 1e6:.0f} MB/s)\n"
            f"- API process peak resident memory (VmHWM): idle {idle:.0f} MiB, after the push "
            f"{after_push:.0f} MiB, after the pull {after_pull:.0f} MiB\n"
            "\nRaw data: `docs/bench/memory.json`.\n"
        )
        print(report)
        write_section(HEADING, report, machine())


if __name__ == "__main__":
    main()
