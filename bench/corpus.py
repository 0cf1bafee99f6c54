"""Build a realistic, offline-reproducible corpus of container image layers for the dedup bench.

Usage::

    python -m bench.corpus build [--out bench/corpus] [--size small|full]
    python -m bench.corpus baseline [--out bench/corpus] [--size small|full]

Host requirements on a fresh Debian 12 machine (run as root; mmdebstrap needs it):

    apt-get install -y mmdebstrap umoci skopeo pigz zstd gzip npm

plus this repo's venv (``zstandard``; ``pip`` is used for ``pip download``). Network: Debian's
mirror (``DEBIAN_MIRROR`` env, default deb.debian.org), PyPI and the npm registry only.

What it builds under ``--out`` (gitignored, never committed):

* ``layers/<layer>.tar``: uncompressed layer diffs (paths relative to /, PAX, sorted, mtimes
  clamped to ``SOURCE_DATE_EPOCH``, numeric owners only, whiteouts ``.wh.<name>`` for deletions):
  - base: Debian minbase root filesystems (mmdebstrap ``--variant=minbase``; "-slim" ones drop
    docs/man/locales with dpkg path-excludes like the official ``*-slim`` images);
  - package: the files added or changed by installing packages, i.e. the diff between two
    mmdebstrap trees (parent vs parent + packages). The same packages on two different parents
    share nearly all file bytes but have different layer digests;
  - app: wheels (``pip download --no-deps``) unpacked into ``usr/local/lib/python3.11/
    site-packages`` and npm tarballs (``npm pack``) unpacked into ``usr/src/app/node_modules``,
    each at two versions.
* ``blobs/<layer>/<producer>.<ext>``: the layer compressed by real producers, 3 per layer in
  rotation, plus every producer on one mid-size layer (see ``PRODUCERS``). A producer whose tool
  is missing is skipped with a message; rerunning ``build`` fills it in later.
* ``index-<size>.json`` (and the symlink ``index.json`` to the last one built): one record per
  blob, per-layer facts, totals, and the baselines written by ``baseline``.

pgzip recipe (klauspost/pgzip, as used by containers/image and umoci): either
``umoci init --layout D && umoci new --image D:t && umoci raw add-layer --image D:t layer.tar``
or an OCI layout holding the *uncompressed* layer (media type ``...layer.v1.tar``) copied with
``skopeo copy --dest-compress --dest-compress-format gzip oci:SRC:t oci:DST:t``. Both write the
pgzip header (mtime bytes ``00 09 6e 88``, OS 255) but their deflate streams differ, so they
are two producers. ``--dest-compress-format zstd`` gives klauspost's zstd encoder.

Go standard library gzip (docker push, BuildKit, crane/kaniko at BestSpeed) comes from the
helpers that ``pipelines/encoders/gohelpers/build.sh`` builds into ``build/helpers/``
(command template: ``GO_GZIP_HELPER_CMD``). Note: Go's and Python's gzip headers are
identical at the default level (mtime 0, XFL 0, OS 255), so the header alone does not tell
these producers apart.
"""

from __future__ import annotations

import argparse
import calendar
import filecmp
import gzip
import hashlib
import io
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "bench" / "corpus"
SOURCE_DATE_EPOCH = 1700000000
DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
NICE = ("nice", "-n", "10")
SITE_PACKAGES = "usr/local/lib/python3.11/site-packages"
NODE_MODULES = "usr/src/app/node_modules"
CHUNK = 1 << 20

# Go standard library gzip helpers (pipelines/encoders/gohelpers/build.sh; stdin tar ->
# stdout gzip).
# One line to adjust: "{go}" is the Go generation (1.26, 1.27), "{level}" the gzip level.
GO_GZIP_HELPER_CMD = "build/helpers/gzip-go{go} -mode=gzip -level={level}"

# dpkg path filters of the official Debian "-slim" images.
SLIM_DPKG_OPTS = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/groff/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/lintian/*",
    "path-exclude=/usr/share/linda/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
)
# Set up merged /usr with mmdebstrap's hook instead of the usrmerge package (which drags in
# perl); this is how the official bookworm images are made. Bullseye images are not merged.
MERGED_USR_HOOK = "/usr/share/mmdebstrap/hooks/merged-usr"
MERGED_USR_SUITES = ("bookworm",)
# Kept as empty directories in layers (like Docker's images): runtime mounts.
EMPTY_DIRS = ("dev", "proc", "sys")


def log(msg: str) -> None:
    print(f"[corpus {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Layer specifications
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rootfs:
    """A Debian root filesystem made by mmdebstrap (minbase + extra packages)."""

    suite: str
    slim: bool = True
    include: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        base = f"{self.suite}{'-slim' if self.slim else ''}"
        return "+".join((base, *self.include))


@dataclass(frozen=True)
class BaseSource:
    rootfs: Rootfs


@dataclass(frozen=True)
class DiffSource:
    parent: Rootfs
    child: Rootfs


@dataclass(frozen=True)
class WheelSource:
    requirements: tuple[str, ...]


@dataclass(frozen=True)
class NpmSource:
    packages: tuple[str, ...]


Source = BaseSource | DiffSource | WheelSource | NpmSource


@dataclass(frozen=True)
class LayerSpec:
    name: str
    group: str
    description: str
    source: Source
    sizes: tuple[str, ...] = ("small", "full")
    compare_to: str | None = None
    all_producers: bool = False


BOOKWORM = Rootfs("bookworm")
BOOKWORM_CURL = Rootfs("bookworm", include=("curl", "ca-certificates"))
BOOKWORM_PY = Rootfs("bookworm", include=("python3",))
BULLSEYE = Rootfs("bullseye")
TRIXIE = Rootfs("trixie")


def _with(parent: Rootfs, *packages: str) -> Rootfs:
    return Rootfs(parent.suite, parent.slim, parent.include + packages)


PY_V1 = (
    "Django==4.2.16",
    "asgiref==3.7.2",
    "sqlparse==0.4.4",
    "requests==2.31.0",
    "urllib3==2.0.7",
    "idna==3.6",
    "certifi==2023.11.17",
    "charset-normalizer==3.3.0",
)
PY_V2 = (
    "Django==5.0.9",
    "asgiref==3.8.1",
    "sqlparse==0.5.1",
    "requests==2.32.3",
    "urllib3==2.2.3",
    "idna==3.8",
    "certifi==2024.8.30",
    "charset-normalizer==3.3.2",
)
NODE_V1 = ("lodash@4.17.20", "express@4.18.2", "react@18.2.0", "react-dom@18.2.0", "moment@2.29.4")
NODE_V2 = ("lodash@4.17.21", "express@4.19.2", "react@18.3.1", "react-dom@18.3.1", "moment@2.30.1")
SCI_V1 = (
    "numpy==1.26.4",
    "pandas==2.1.4",
    "python-dateutil==2.8.2",
    "pytz==2023.3",
    "six==1.16.0",
    "tzdata==2023.3",
)
SCI_V2 = (
    "numpy==2.0.2",
    "pandas==2.2.3",
    "python-dateutil==2.9.0",
    "pytz==2024.2",
    "six==1.16.0",
    "tzdata==2024.2",
)
TS_V1 = ("typescript@5.3.3", "@types/node@20.10.0", "undici-types@5.26.5")
TS_V2 = ("typescript@5.4.5", "@types/node@20.12.7", "undici-types@5.26.5")
FULL = ("full",)

LAYERS: tuple[LayerSpec, ...] = (
    LayerSpec(
        "bookworm-slim", "base", "Debian bookworm minbase, slim (mmdebstrap)", BaseSource(BOOKWORM)
    ),
    LayerSpec(
        "bookworm-slim.curl",
        "package",
        "curl ca-certificates on bookworm-slim",
        DiffSource(BOOKWORM, BOOKWORM_CURL),
    ),
    LayerSpec(
        "bookworm-slim.python3",
        "package",
        "python3 on bookworm-slim",
        DiffSource(BOOKWORM, BOOKWORM_PY),
        all_producers=True,
    ),
    LayerSpec(
        "bookworm-slim.curl.python3",
        "package",
        "python3 on bookworm-slim+curl (same packages, other parent)",
        DiffSource(BOOKWORM_CURL, _with(BOOKWORM_CURL, "python3")),
        compare_to="bookworm-slim.python3",
    ),
    LayerSpec(
        "app-py-v1",
        "app",
        "pip wheels: Django 4.2, requests 2.31, urllib3 2.0 + deps",
        WheelSource(PY_V1),
    ),
    LayerSpec(
        "app-py-v2",
        "app",
        "pip wheels: Django 5.0, requests 2.32, urllib3 2.2 + deps",
        WheelSource(PY_V2),
        compare_to="app-py-v1",
    ),
    LayerSpec(
        "app-node-v1",
        "app",
        "npm: lodash, express, react, react-dom, moment (older)",
        NpmSource(NODE_V1),
    ),
    LayerSpec(
        "app-node-v2",
        "app",
        "npm: lodash, express, react, react-dom, moment (newer)",
        NpmSource(NODE_V2),
        compare_to="app-node-v1",
    ),
    # -- full only --
    LayerSpec(
        "bookworm",
        "base",
        "Debian bookworm minbase with docs/man/locales",
        BaseSource(Rootfs("bookworm", slim=False)),
        FULL,
        compare_to="bookworm-slim",
    ),
    LayerSpec(
        "bullseye-slim",
        "base",
        "Debian bullseye minbase, slim",
        BaseSource(BULLSEYE),
        FULL,
        compare_to="bookworm-slim",
    ),
    LayerSpec(
        "trixie-slim",
        "base",
        "Debian trixie minbase, slim",
        BaseSource(TRIXIE),
        FULL,
        compare_to="bookworm-slim",
    ),
    LayerSpec(
        "bullseye-slim.python3",
        "package",
        "python3 on bullseye-slim (other release)",
        DiffSource(BULLSEYE, _with(BULLSEYE, "python3")),
        FULL,
        compare_to="bookworm-slim.python3",
    ),
    LayerSpec(
        "trixie-slim.python3",
        "package",
        "python3 on trixie-slim (other release)",
        DiffSource(TRIXIE, _with(TRIXIE, "python3")),
        FULL,
        compare_to="bookworm-slim.python3",
    ),
    LayerSpec(
        "bookworm-slim.build-essential",
        "package",
        "build-essential on bookworm-slim",
        DiffSource(BOOKWORM, _with(BOOKWORM, "build-essential")),
        FULL,
    ),
    LayerSpec(
        "bookworm-slim.python3.build-essential",
        "package",
        "build-essential on bookworm-slim+python3 (same packages, other parent)",
        DiffSource(BOOKWORM_PY, _with(BOOKWORM_PY, "build-essential")),
        FULL,
        compare_to="bookworm-slim.build-essential",
    ),
    LayerSpec(
        "app-sci-v1", "app", "pip wheels: numpy 1.26, pandas 2.1 + deps", WheelSource(SCI_V1), FULL
    ),
    LayerSpec(
        "app-sci-v2",
        "app",
        "pip wheels: numpy 2.0, pandas 2.2 + deps",
        WheelSource(SCI_V2),
        FULL,
        compare_to="app-sci-v1",
    ),
    LayerSpec("app-ts-v1", "app", "npm: typescript 5.3, @types/node 20.10", NpmSource(TS_V1), FULL),
    LayerSpec(
        "app-ts-v2",
        "app",
        "npm: typescript 5.4, @types/node 20.12",
        NpmSource(TS_V2),
        FULL,
        compare_to="app-ts-v1",
    ),
    # Appended last so existing layers keep their producer rotation (see producers_for).
    LayerSpec(
        "bookworm-slim.curl.purge-curl",
        "package",
        "apt-get purge curl ca-certificates on bookworm-slim+curl (whiteouts)",
        DiffSource(BOOKWORM_CURL, BOOKWORM),
    ),
)


def layers_for(size: str) -> list[LayerSpec]:
    return [spec for spec in LAYERS if size in spec.sizes]


# ---------------------------------------------------------------------------------------------
# Paths and small helpers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dirs:
    out: Path

    @property
    def work(self) -> Path:
        return self.out / "work"

    @property
    def rootfs(self) -> Path:
        return self.work / "rootfs"

    @property
    def downloads(self) -> Path:
        return self.work / "downloads"

    @property
    def tmp(self) -> Path:
        return self.work / "tmp"

    def layer_tar(self, name: str) -> Path:
        return self.out / "layers" / f"{name}.tar"

    def layer_meta(self, name: str) -> Path:
        return self.out / "layers" / f"{name}.json"

    def blob(self, layer: str, producer: Producer) -> Path:
        return self.out / "blobs" / layer / f"{producer.name}{producer.ext}"

    def index(self, size: str) -> Path:
        return self.out / f"index-{size}.json"


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, check=True, **kwargs)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: Path, writer: Callable[[Path], None]) -> None:
    """Run writer on a temporary sibling and rename it into place only when it succeeded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        writer(partial)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def path_key(rel: str) -> list[str]:
    return rel.split("/")


# ---------------------------------------------------------------------------------------------
# Root filesystems (mmdebstrap) and their diffs
# ---------------------------------------------------------------------------------------------


def mmdebstrap_argv(rootfs: Rootfs, target: Path) -> list[str]:
    log_file = target.with_name(target.name + ".log")
    argv = [*NICE, "mmdebstrap", "--mode=root", "--variant=minbase", f"--logfile={log_file}"]
    if rootfs.include:
        argv.append("--include=" + ",".join(rootfs.include))
    if rootfs.slim:
        argv += [f"--dpkgopt={opt}" for opt in SLIM_DPKG_OPTS]
    if rootfs.suite in MERGED_USR_SUITES:
        argv.append(f"--hook-dir={MERGED_USR_HOOK}")
    return [*argv, rootfs.suite, str(target), DEBIAN_MIRROR]


def ensure_rootfs(dirs: Dirs, rootfs: Rootfs) -> Path:
    target = dirs.rootfs / rootfs.key
    done = target.with_name(target.name + ".done")
    if done.exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"mmdebstrap {rootfs.key} ...")
    started = time.monotonic()
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH)}
    try:
        run(mmdebstrap_argv(rootfs, target), env=env)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        log(f"mmdebstrap {rootfs.key} failed, see {target}.log")
        raise
    done.write_text(f"{time.monotonic() - started:.1f}s\n")
    log(f"mmdebstrap {rootfs.key} done in {time.monotonic() - started:.0f}s")
    return target


def scan_tree(root: Path) -> dict[str, os.stat_result]:
    """All paths under root (relative, no leading slash) with their lstat, runtime dirs empty."""
    found: dict[str, os.stat_result] = {}

    def walk(directory: Path, prefix: str) -> None:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            rel = prefix + entry.name
            found[rel] = entry.stat(follow_symlinks=False)
            if entry.is_dir(follow_symlinks=False) and rel not in EMPTY_DIRS:
                walk(Path(entry.path), rel + "/")

    walk(root, "")
    return found


def same_entry(
    old_root: Path, new_root: Path, rel: str, old: os.stat_result, new: os.stat_result
) -> bool:
    """True when a path is unchanged between two trees (mtime and inode ignored)."""
    if (old.st_mode, old.st_uid, old.st_gid) != (new.st_mode, new.st_uid, new.st_gid):
        return False
    if stat.S_ISLNK(new.st_mode):
        return os.readlink(old_root / rel) == os.readlink(new_root / rel)
    if stat.S_ISREG(new.st_mode):
        return old.st_size == new.st_size and filecmp.cmp(
            old_root / rel, new_root / rel, shallow=False
        )
    if stat.S_ISCHR(new.st_mode) or stat.S_ISBLK(new.st_mode):
        return old.st_rdev == new.st_rdev
    return True


def with_ancestors(paths: Iterable[str]) -> set[str]:
    result: set[str] = set()
    for rel in paths:
        parts = rel.split("/")
        result.update("/".join(parts[:depth]) for depth in range(1, len(parts) + 1))
    return result


def top_level_deletions(
    old: dict[str, os.stat_result], new: dict[str, os.stat_result]
) -> list[str]:
    """Deleted paths not already hidden by a deleted or replaced (no longer a dir) parent."""

    def parent_is_dir(rel: str) -> bool:
        parent = rel.rpartition("/")[0]
        return not parent or (parent in new and stat.S_ISDIR(new[parent].st_mode))

    return sorted((rel for rel in old if rel not in new and parent_is_dir(rel)), key=path_key)


def whiteout_name(rel: str) -> str:
    parent, _, name = rel.rpartition("/")
    return f"{parent}/.wh.{name}" if parent else f".wh.{name}"


def tree_diff(old_root: Path, new_root: Path) -> tuple[list[str], list[str]]:
    """(paths to store, whiteout paths) that turn old_root into new_root, overlay style."""
    old, new = scan_tree(old_root), scan_tree(new_root)
    changed = [
        rel
        for rel, st in new.items()
        if rel not in old or not same_entry(old_root, new_root, rel, old[rel], st)
    ]
    deleted = top_level_deletions(old, new)
    stored = with_ancestors(changed) | with_ancestors(
        rel.rpartition("/")[0] for rel in deleted if "/" in rel
    )
    return sorted(stored, key=path_key), [whiteout_name(rel) for rel in deleted]


# ---------------------------------------------------------------------------------------------
# Layer tar writing
# ---------------------------------------------------------------------------------------------


def normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime = min(int(info.mtime), SOURCE_DATE_EPOCH)
    info.uname = info.gname = ""
    return info


def add_from_tree(tar: tarfile.TarFile, root: Path, rel: str) -> None:
    info = tar.gettarinfo(str(root / rel), arcname=rel)
    if info is None:  # sockets cannot be stored
        return
    normalize(info)
    if info.isreg():
        with (root / rel).open("rb") as handle:
            tar.addfile(info, handle)
    else:
        tar.addfile(info)


def add_whiteout(tar: tarfile.TarFile, rel: str) -> None:
    info = tarfile.TarInfo(rel)
    info.mode, info.mtime = 0o644, SOURCE_DATE_EPOCH
    tar.addfile(normalize(info))


def write_tree_tar(dest: Path, root: Path, paths: list[str], whiteouts: list[str]) -> None:
    entries = [(rel, False) for rel in paths] + [(rel, True) for rel in whiteouts]
    entries.sort(key=lambda item: path_key(item[0]))
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel, is_whiteout in entries:
            if is_whiteout:
                add_whiteout(tar, rel)
            else:
                add_from_tree(tar, root, rel)


@dataclass
class MemberSet:
    """In-memory members for app layers (wheel / npm content), written sorted with parents."""

    files: dict[str, tuple[bytes, int, int]] = field(default_factory=dict)

    def add(self, rel: str, data: bytes, mode: int, mtime: int) -> None:
        self.files[rel] = (data, mode, mtime)

    def write(self, dest: Path) -> None:
        dirs = with_ancestors(rel.rpartition("/")[0] for rel in self.files if "/" in rel)
        names = sorted(dirs | set(self.files), key=path_key)
        with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
            for rel in names:
                tar.addfile(*self.member(rel))

    def member(self, rel: str) -> tuple[tarfile.TarInfo, io.BytesIO | None]:
        info = tarfile.TarInfo(rel)
        if rel not in self.files:
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, SOURCE_DATE_EPOCH
            return normalize(info), None
        data, info.mode, info.mtime = self.files[rel]
        info.size = len(data)
        return normalize(info), io.BytesIO(data)


# -- wheels -------------------------------------------------------------------------------------


def pip_download(dirs: Dirs, requirement: str) -> Path:
    target = dirs.downloads / "pip" / requirement.replace("==", "-").lower()
    wheels = sorted(target.glob("*.whl")) if target.exists() else []
    if wheels:
        return wheels[0]
    log(f"pip download {requirement}")
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
            "--abi",
            "cp311",
            "--platform",
            "manylinux2014_x86_64",
            "--dest",
            str(target),
            requirement,
        ]
    )
    return sorted(target.glob("*.whl"))[0]


def wheel_destination(name: str) -> str:
    """Install path of a wheel member (purelib/platlib/scripts/data schemes)."""
    top, _, rest = name.partition("/")
    if not top.endswith(".data"):
        return f"{SITE_PACKAGES}/{name}"
    scheme, _, sub = rest.partition("/")
    prefixes = {
        "purelib": SITE_PACKAGES,
        "platlib": SITE_PACKAGES,
        "scripts": "usr/local/bin",
        "data": "usr/local",
        "headers": "usr/local/include/python3.11",
    }
    return f"{prefixes.get(scheme, 'usr/local')}/{sub}"


def zip_mode(member: zipfile.ZipInfo) -> int:
    mode = (member.external_attr >> 16) & 0o7777
    return 0o755 if mode & 0o111 else 0o644


def add_wheel(members: MemberSet, wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            if member.is_dir():
                continue
            mtime = calendar.timegm((*member.date_time, 0, 0, 0))
            members.add(
                wheel_destination(member.filename), archive.read(member), zip_mode(member), mtime
            )
            if member.filename.endswith(".dist-info/RECORD"):
                dist_info = wheel_destination(member.filename).rpartition("/")[0]
                members.add(f"{dist_info}/INSTALLER", b"pip\n", 0o644, SOURCE_DATE_EPOCH)


def write_wheel_layer(dirs: Dirs, source: WheelSource, dest: Path) -> None:
    members = MemberSet()
    for requirement in source.requirements:
        add_wheel(members, pip_download(dirs, requirement))
    members.write(dest)


# -- npm ----------------------------------------------------------------------------------------


def npm_pack(dirs: Dirs, package: str) -> Path:
    target = dirs.downloads / "npm" / package.replace("/", "__")
    packed = sorted(target.glob("*.tgz")) if target.exists() else []
    if packed:
        return packed[0]
    log(f"npm pack {package}")
    target.mkdir(parents=True, exist_ok=True)
    run(
        ["npm", "pack", "--silent", "--pack-destination", str(target), package],
        stdout=subprocess.DEVNULL,
        cwd=target,
    )
    return sorted(target.glob("*.tgz"))[0]


def add_npm_tarball(members: MemberSet, package: str, tarball: Path) -> None:
    name = package.rpartition("@")[0]
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive:
            extracted = archive.extractfile(member) if member.isreg() else None
            if extracted is None:
                continue
            rel = member.name.partition("/")[2]  # drop "package/"
            mode = 0o755 if member.mode & 0o111 else 0o644
            members.add(f"{NODE_MODULES}/{name}/{rel}", extracted.read(), mode, int(member.mtime))


def write_npm_layer(dirs: Dirs, source: NpmSource, dest: Path) -> None:
    members = MemberSet()
    for package in source.packages:
        add_npm_tarball(members, package, npm_pack(dirs, package))
    members.write(dest)


# -- dispatch -----------------------------------------------------------------------------------


def write_layer(dirs: Dirs, spec: LayerSpec, dest: Path) -> None:
    source = spec.source
    if isinstance(source, BaseSource):
        root = ensure_rootfs(dirs, source.rootfs)
        write_tree_tar(dest, root, sorted(scan_tree(root), key=path_key), [])
    elif isinstance(source, DiffSource):
        parent, child = ensure_rootfs(dirs, source.parent), ensure_rootfs(dirs, source.child)
        paths, whiteouts = tree_diff(parent, child)
        write_tree_tar(dest, child, paths, whiteouts)
    elif isinstance(source, WheelSource):
        write_wheel_layer(dirs, source, dest)
    else:
        write_npm_layer(dirs, source, dest)


def count_members(path: Path) -> dict[str, int]:
    counts = {"members": 0, "regular_files": 0, "payload_bytes": 0}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            counts["members"] += 1
            if member.isreg():
                counts["regular_files"] += 1
                counts["payload_bytes"] += member.size
    return counts


def ensure_layer(dirs: Dirs, spec: LayerSpec) -> dict[str, Any]:
    tar_path, meta_path = dirs.layer_tar(spec.name), dirs.layer_meta(spec.name)
    if tar_path.exists() and meta_path.exists():
        meta: dict[str, Any] = json.loads(meta_path.read_text())
        return meta
    log(f"layer {spec.name} ...")
    started = time.monotonic()
    write_atomic(tar_path, lambda dest: write_layer(dirs, spec, dest))
    meta = {
        "tar_sha256": sha256_file(tar_path),
        "tar_size": tar_path.stat().st_size,
        **count_members(tar_path),
        "build_seconds": round(time.monotonic() - started, 1),
    }
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    log(f"layer {spec.name}: {meta['tar_size'] / 1e6:.1f} MB, {meta['regular_files']} files")
    return meta


# ---------------------------------------------------------------------------------------------
# Producers (compressors)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Producer:
    name: str
    ext: str
    kind: str  # "tar", "gzip" or "zstd"
    command: str  # human-readable recipe, recorded in the index
    compress: Callable[[Path, Path, Path], None]  # (layer tar, destination, scratch dir)
    requires: tuple[str, ...] = ()
    rotate: bool = True  # False: only on the layers that get every producer

    def missing(self) -> str | None:
        for tool in self.requires:
            if "/" in tool:
                if not os.access(REPO_ROOT / tool, os.X_OK):
                    return f"helper {tool} not found"
            elif shutil.which(tool) is None:
                return f"{tool} not installed"
        return None


def copy_as_blob(src: Path, dest: Path, _scratch: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def python_gzip(level: int) -> Callable[[Path, Path, Path], None]:
    def compress(src: Path, dest: Path, _scratch: Path) -> None:
        with (
            src.open("rb") as raw,
            dest.open("wb") as out,
            gzip.GzipFile(
                filename="", mode="wb", fileobj=out, compresslevel=level, mtime=0
            ) as packed,
        ):
            shutil.copyfileobj(raw, packed, CHUNK)

    return compress


def python_zstd(level: int) -> Callable[[Path, Path, Path], None]:
    def compress(src: Path, dest: Path, _scratch: Path) -> None:
        compressor = zstandard.ZstdCompressor(level=level)
        with src.open("rb") as raw, dest.open("wb") as out:
            compressor.copy_stream(raw, out, size=src.stat().st_size)

    return compress


def pipe_command(argv: list[str]) -> Callable[[Path, Path, Path], None]:
    """A filter command reading the tar on stdin and writing the blob on stdout."""

    def compress(src: Path, dest: Path, _scratch: Path) -> None:
        with src.open("rb") as raw, dest.open("wb") as out:
            run([*NICE, *argv], stdin=raw, stdout=out)

    return compress


def go_helper_argv(go: str, level: int) -> list[str]:
    argv = shlex.split(GO_GZIP_HELPER_CMD.format(go=go, level=level))
    return [str(REPO_ROOT / argv[0]), *argv[1:]]


def oci_blob_path(layout: Path, digest: str) -> Path:
    algorithm, _, hexdigest = digest.partition(":")
    return layout / "blobs" / algorithm / hexdigest


def last_layer_of(layout: Path) -> Path:
    index = json.loads((layout / "index.json").read_text())
    manifest_path = oci_blob_path(layout, index["manifests"][0]["digest"])
    manifest = json.loads(manifest_path.read_text())
    return oci_blob_path(layout, manifest["layers"][-1]["digest"])


def write_json_blob(layout: Path, document: dict[str, Any]) -> tuple[str, int]:
    data = json.dumps(document, sort_keys=True).encode()
    digest = hashlib.sha256(data).hexdigest()
    oci_blob_path(layout, f"sha256:{digest}").write_bytes(data)
    return f"sha256:{digest}", len(data)


def write_uncompressed_layout(layout: Path, layer_tar: Path) -> None:
    """An OCI image layout whose single layer is the uncompressed tar (hard-linked in)."""
    (layout / "blobs" / "sha256").mkdir(parents=True)
    layer_digest = f"sha256:{sha256_file(layer_tar)}"
    copy_as_blob(layer_tar, oci_blob_path(layout, layer_digest), layout)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }
    config_digest, config_size = write_json_blob(layout, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest,
                "size": layer_tar.stat().st_size,
            }
        ],
    }
    manifest_digest, manifest_size = write_json_blob(layout, manifest)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest_size,
                "annotations": {"org.opencontainers.image.ref.name": "layer"},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')


def skopeo_compress(fmt: str) -> Callable[[Path, Path, Path], None]:
    def compress(src: Path, dest: Path, scratch: Path) -> None:
        write_uncompressed_layout(scratch / "src", src)
        run(
            [
                *NICE,
                "skopeo",
                "copy",
                "--quiet",
                "--dest-compress",
                f"--dest-compress-format={fmt}",
                f"oci:{scratch / 'src'}:layer",
                f"oci:{scratch / 'dst'}:layer",
            ]
        )
        shutil.move(last_layer_of(scratch / "dst"), dest)

    return compress


def umoci_compress(src: Path, dest: Path, scratch: Path) -> None:
    layout = scratch / "umoci"
    run([*NICE, "umoci", "init", "--layout", str(layout)])
    run([*NICE, "umoci", "new", "--image", f"{layout}:layer"])
    run([*NICE, "umoci", "raw", "add-layer", "--image", f"{layout}:layer", str(src)])
    shutil.move(last_layer_of(layout), dest)


def go_helper_producer(
    name: str, go: str, level: int, description: str, rotate: bool = True
) -> Producer:
    argv = shlex.split(GO_GZIP_HELPER_CMD.format(go=go, level=level))
    return Producer(
        name,
        ".tar.gz",
        "gzip",
        f"{shlex.join(argv)} < tar  # {description}",
        pipe_command(go_helper_argv(go, level)),
        (argv[0],),
        rotate,
    )


# Rotation order matters: consecutive triples go to one layer, so the two Go helpers (which
# may be missing) never land on the same layer.
PRODUCERS: tuple[Producer, ...] = (
    Producer("tar", ".tar", "tar", "uncompressed layer tar", copy_as_blob),
    Producer(
        "py-gzip-6",
        ".tar.gz",
        "gzip",
        "python gzip.GzipFile(compresslevel=6, mtime=0) (zlib)",
        python_gzip(6),
    ),
    go_helper_producer(
        "go126-gzip-default",
        "1.26",
        -1,
        "Go 1.26 compress/gzip DefaultCompression (docker, BuildKit)",
    ),
    Producer(
        "gnu-gzip",
        ".tar.gz",
        "gzip",
        "gzip -n -c (GNU gzip, level 6)",
        pipe_command(["gzip", "-n", "-c"]),
        ("gzip",),
    ),
    Producer(
        "pigz",
        ".tar.gz",
        "gzip",
        "pigz -n -c -p 2 (level 6)",
        pipe_command(["pigz", "-n", "-c", "-p", "2"]),
        ("pigz",),
    ),
    go_helper_producer(
        "go126-gzip-bestspeed", "1.26", 1, "Go 1.26 compress/gzip BestSpeed (crane, ko, kaniko)"
    ),
    Producer(
        "zstd-cli-3",
        ".tar.zst",
        "zstd",
        "zstd -3 -c -q (zstd CLI, stdin)",
        pipe_command(["zstd", "-3", "-c", "-q"]),
        ("zstd",),
    ),
    Producer(
        "py-zstd-3",
        ".tar.zst",
        "zstd",
        "python-zstandard ZstdCompressor(level=3).copy_stream(size=tar size)",
        python_zstd(3),
    ),
    Producer(
        "skopeo-pgzip",
        ".tar.gz",
        "gzip",
        "skopeo copy --dest-compress --dest-compress-format=gzip oci:uncompressed oci:out",
        skopeo_compress("gzip"),
        ("skopeo",),
    ),
    Producer(
        "umoci-pgzip",
        ".tar.gz",
        "gzip",
        "umoci init; umoci new; umoci raw add-layer --image layout:tag layer.tar",
        umoci_compress,
        ("umoci",),
    ),
    Producer(
        "py-gzip-9",
        ".tar.gz",
        "gzip",
        "python gzip.GzipFile(compresslevel=9, mtime=0) (zlib)",
        python_gzip(9),
    ),
    Producer(
        "skopeo-zstd",
        ".tar.zst",
        "zstd",
        "skopeo copy --dest-compress --dest-compress-format=zstd (klauspost zstd)",
        skopeo_compress("zstd"),
        ("skopeo",),
    ),
    go_helper_producer(
        "go127-gzip-default",
        "1.27",
        -1,
        "Go 1.27 compress/gzip DefaultCompression (docker built with Go 1.27)",
        rotate=False,
    ),
)
ROTATION = tuple(producer for producer in PRODUCERS if producer.rotate)
PER_LAYER = 3
MAGIC = {"gzip": b"\x1f\x8b", "zstd": b"\x28\xb5\x2f\xfd"}


def producers_for(spec: LayerSpec) -> list[Producer]:
    """Every producer for all_producers layers, else 3 in rotation by the layer's place in
    LAYERS (stable across sizes, so small and full share blobs)."""
    if spec.all_producers:
        return list(PRODUCERS)
    start = LAYERS.index(spec) * PER_LAYER
    return [ROTATION[(start + k) % len(ROTATION)] for k in range(PER_LAYER)]


def check_magic(producer: Producer, blob: Path) -> None:
    expected = MAGIC.get(producer.kind)
    if expected is not None and not read_head(blob, 4).startswith(expected):
        raise RuntimeError(f"{producer.name} wrote {blob} without {producer.kind} magic")


def ensure_blob(dirs: Dirs, layer: str, producer: Producer) -> Path | None:
    dest = dirs.blob(layer, producer)
    if dest.exists():
        return dest
    reason = producer.missing()
    if reason is not None:
        log(f"skip {producer.name} for {layer}: {reason}")
        return None
    scratch = dirs.tmp / f"{layer}.{producer.name}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    started = time.monotonic()
    try:
        write_atomic(dest, lambda out: producer.compress(dirs.layer_tar(layer), out, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    check_magic(producer, dest)
    log(
        f"blob {layer}/{producer.name}: {dest.stat().st_size / 1e6:.1f} MB "
        f"in {time.monotonic() - started:.1f}s"
    )
    return dest


# ---------------------------------------------------------------------------------------------
# Index
# ---------------------------------------------------------------------------------------------


def blob_record(
    dirs: Dirs, spec: LayerSpec, meta: dict[str, Any], producer: Producer, blob: Path
) -> dict[str, Any]:
    return {
        "path": str(blob.relative_to(dirs.out)),
        "digest": f"sha256:{sha256_file(blob)}",
        "size": blob.stat().st_size,
        "producer": producer.name,
        "kind": producer.kind,
        "layer": spec.name,
        "tar_sha256": f"sha256:{meta['tar_sha256']}",
        "tar_size": meta["tar_size"],
        "group": spec.group,
        "description": f"{spec.description}; {producer.command}",
        "header_hex": read_head(blob, 10).hex(),
    }


def read_head(path: Path, size: int) -> bytes:
    with path.open("rb") as handle:
        return handle.read(size)


def layer_record(dirs: Dirs, spec: LayerSpec, meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": spec.name,
        "group": spec.group,
        "description": spec.description,
        "path": str(dirs.layer_tar(spec.name).relative_to(dirs.out)),
        "compare_to": spec.compare_to,
        **meta,
        "tar_sha256": f"sha256:{meta['tar_sha256']}",
    }


def totals(layers: list[dict[str, Any]], blobs: list[dict[str, Any]]) -> dict[str, Any]:
    per_producer: dict[str, dict[str, int]] = {}
    for blob in blobs:
        entry = per_producer.setdefault(blob["producer"], {"blobs": 0, "bytes": 0, "tar_bytes": 0})
        entry["blobs"] += 1
        entry["bytes"] += blob["size"]
        entry["tar_bytes"] += blob["tar_size"]
    per_group: dict[str, int] = {}
    for layer in layers:
        per_group[layer["group"]] = per_group.get(layer["group"], 0) + layer["tar_size"]
    return {
        "layers": len(layers),
        "blobs": len(blobs),
        "layer_tar_bytes": sum(layer["tar_size"] for layer in layers),
        "blob_bytes": sum(blob["size"] for blob in blobs),
        "layer_tar_bytes_per_group": per_group,
        "per_producer": per_producer,
    }


def producer_table() -> dict[str, dict[str, Any]]:
    return {
        p.name: {"kind": p.kind, "command": p.command, "missing": p.missing()} for p in PRODUCERS
    }


def load_index(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def save_index(dirs: Dirs, size: str, index: dict[str, Any], relink: bool) -> None:
    """Write index-<size>.json; with relink, point index.json at it (the last build)."""
    path = dirs.index(size)
    path.write_text(json.dumps(index, indent=1) + "\n")
    if not relink:
        return
    link = dirs.out / "index.json"
    link.unlink(missing_ok=True)
    link.symlink_to(path.name)


def build(dirs: Dirs, size: str) -> dict[str, Any]:
    started = time.monotonic()
    specs = layers_for(size)
    layers, blobs = [], []
    for spec in specs:
        meta = ensure_layer(dirs, spec)
        layers.append(layer_record(dirs, spec, meta))
        for producer in producers_for(spec):
            blob = ensure_blob(dirs, spec.name, producer)
            if blob is not None:
                blobs.append(blob_record(dirs, spec, meta, producer, blob))
    previous = load_index(dirs.index(size))
    index: dict[str, Any] = {
        "format": 1,
        "size": size,
        "source_date_epoch": SOURCE_DATE_EPOCH,
        "producers": producer_table(),
        "layers": layers,
        "blobs": blobs,
        "totals": totals(layers, blobs),
    }
    if "baseline" in previous:
        index["baseline"] = previous["baseline"]
        index["baseline"]["stale"] = previous.get("layers") != layers
    save_index(dirs, size, index, relink=True)
    log(
        f"build {size}: {len(layers)} layers, {len(blobs)} blobs "
        f"in {time.monotonic() - started:.0f}s"
    )
    return index


# ---------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------


@dataclass
class PayloadStats:
    """File-level facts gathered over every layer tar of the corpus."""

    stored: dict[str, int] = field(default_factory=dict)  # payload sha256 -> stored bytes
    raw: dict[str, int] = field(default_factory=dict)  # payload sha256 -> raw bytes
    per_layer: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    non_payload_raw: int = 0
    non_payload_zstd: int = 0


def payload_ranges(tar_path: Path) -> list[tuple[int, int]]:
    with tarfile.open(tar_path, "r:") as tar:
        return [(m.offset_data, m.size) for m in tar if m.isreg() and not m.issparse()]


def read_range(handle: io.BufferedReader, offset: int, size: int) -> bytes:
    handle.seek(offset)
    return handle.read(size)


def scan_layer(
    stats: PayloadStats, name: str, tar_path: Path, compressor: zstandard.ZstdCompressor
) -> None:
    files: list[tuple[str, int]] = []
    skeleton, position = bytearray(), 0
    with tar_path.open("rb") as handle:
        for offset, size in payload_ranges(tar_path):
            skeleton += read_range(handle, position, offset - position)
            payload, position = read_range(handle, offset, size), offset + size
            digest = hashlib.sha256(payload).hexdigest()
            files.append((digest, size))
            if digest not in stats.stored:
                stats.raw[digest] = size
                stats.stored[digest] = min(size, len(compressor.compress(payload)))
        handle.seek(position)
        skeleton += handle.read()
    stats.per_layer[name] = files
    stats.non_payload_raw += len(skeleton)
    stats.non_payload_zstd += len(compressor.compress(bytes(skeleton)))


def ideal_store(stats: PayloadStats, tar_bytes: int) -> dict[str, Any]:
    payload = sum(stats.stored.values())
    total = payload + stats.non_payload_zstd
    return {
        "unique_payloads": len(stats.stored),
        "unique_payload_raw_bytes": sum(stats.raw.values()),
        "payload_store_bytes": payload,
        "non_payload_raw_bytes": stats.non_payload_raw,
        "non_payload_zstd_bytes": stats.non_payload_zstd,
        "ideal_store_bytes": total,
        "layer_tar_bytes": tar_bytes,
        "reduction_vs_tars": round(tar_bytes / total, 3) if total else None,
    }


def share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def duplicate_stats(stats: PayloadStats, layers: list[dict[str, Any]]) -> dict[str, Any]:
    all_files = [item for files in stats.per_layer.values() for item in files]
    files_total, bytes_total = len(all_files), sum(size for _, size in all_files)
    bytes_unique = sum(stats.raw.values())
    result: dict[str, Any] = {
        "files_total": files_total,
        "files_unique": len(stats.raw),
        "duplicate_file_share": share(files_total - len(stats.raw), files_total),
        "bytes_total": bytes_total,
        "bytes_unique": bytes_unique,
        "duplicate_byte_share": share(bytes_total - bytes_unique, bytes_total),
    }
    result["pairs"] = [
        pair_overlap(stats, layer["name"], layer["compare_to"])
        for layer in layers
        if layer["compare_to"] in stats.per_layer
    ]
    result["shared_with_other_layers"] = {
        name: shared_with_others(stats, name) for name in stats.per_layer
    }
    return result


def pair_overlap(stats: PayloadStats, name: str, other: str) -> dict[str, Any]:
    """Share of a layer's files and payload bytes whose content also occurs in `other`."""
    known = {digest for digest, _ in stats.per_layer[other]}
    files = stats.per_layer[name]
    hits = [size for digest, size in files if digest in known]
    return {
        "layer": name,
        "compare_to": other,
        "file_share": share(len(hits), len(files)),
        "byte_share": share(sum(hits), sum(size for _, size in files)),
    }


def shared_with_others(stats: PayloadStats, name: str) -> float | None:
    known = {
        digest for layer, files in stats.per_layer.items() if layer != name for digest, _ in files
    }
    files = stats.per_layer[name]
    return share(
        sum(size for digest, size in files if digest in known), sum(size for _, size in files)
    )


DECOMPRESS = {"gzip": ["gzip", "-dc"], "zstd": ["zstd", "-dc", "-q"]}


def timed_digest(blob: Path, kind: str) -> tuple[str, float]:
    """sha256 of the decompressed blob via `zcat | sha256sum` (or zstd -dc), and wall time."""
    started = time.monotonic()
    with blob.open("rb") as raw:
        if kind in DECOMPRESS:
            inflate = subprocess.Popen(DECOMPRESS[kind], stdin=raw, stdout=subprocess.PIPE)
            digest = subprocess.run(
                ["sha256sum"], stdin=inflate.stdout, check=True, capture_output=True
            ).stdout
            if inflate.wait() != 0:
                raise RuntimeError(f"cannot decompress {blob}")
        else:
            digest = subprocess.run(
                ["sha256sum"], stdin=raw, check=True, capture_output=True
            ).stdout
    return "sha256:" + digest.split()[0].decode(), time.monotonic() - started


def best_of(blob: Path, kind: str, repeat: int) -> tuple[str, float]:
    """Digest and the fastest of `repeat` timed runs (the machine is shared, so take the min)."""
    runs = [timed_digest(blob, kind) for _ in range(repeat)]
    return runs[0][0], min(seconds for _, seconds in runs)


def throughput(dirs: Dirs, blobs: list[dict[str, Any]], repeat: int) -> dict[str, Any]:
    groups: dict[str, dict[str, float]] = {}
    mismatches = []
    load_before = round(os.getloadavg()[0], 2)
    for blob in blobs:
        digest, seconds = best_of(dirs.out / blob["path"], blob["kind"], repeat)
        if digest != blob["tar_sha256"]:
            mismatches.append(blob["path"])
        for key in (blob["producer"], f"all-{blob['kind']}"):
            group = groups.setdefault(
                key, {"blobs": 0, "compressed_bytes": 0, "uncompressed_bytes": 0, "seconds": 0.0}
            )
            group["blobs"] += 1
            group["compressed_bytes"] += blob["size"]
            group["uncompressed_bytes"] += blob["tar_size"]
            group["seconds"] += seconds
    for group in groups.values():
        group["mb_s_compressed"] = round(group["compressed_bytes"] / 1e6 / group["seconds"], 1)
        group["mb_s_uncompressed"] = round(group["uncompressed_bytes"] / 1e6 / group["seconds"], 1)
        group["seconds"] = round(group["seconds"], 2)
    return {
        "method": "gzip -dc | sha256sum (zstd -dc for zstd; sha256sum for tar), "
        f"one blob at a time, best of {repeat} runs per blob",
        "digest_mismatches": mismatches,
        "cpus": os.cpu_count(),
        "loadavg_1min": [load_before, round(os.getloadavg()[0], 2)],
        "groups": groups,
    }


def baseline(dirs: Dirs, size: str, repeat: int) -> dict[str, Any]:
    index = load_index(dirs.index(size))
    if not index:
        raise SystemExit(f"no {dirs.index(size)}: run `build --size {size}` first")
    stats, compressor = PayloadStats(), zstandard.ZstdCompressor(level=3)
    for layer in index["layers"]:
        log(f"scan {layer['name']}")
        scan_layer(stats, layer["name"], dirs.out / layer["path"], compressor)
    tar_bytes = sum(layer["tar_size"] for layer in index["layers"])
    log("timing decompression ...")
    index["baseline"] = {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "stale": False,
        "ideal_store": ideal_store(stats, tar_bytes),
        "decompress_throughput": throughput(dirs, index["blobs"], repeat),
        "duplicates": duplicate_stats(stats, index["layers"]),
    }
    save_index(dirs, size, index, relink=False)
    return index


# ---------------------------------------------------------------------------------------------
# Reporting and CLI
# ---------------------------------------------------------------------------------------------


def print_build_summary(index: dict[str, Any]) -> None:
    print(f"{'layer':40} {'group':8} {'tar MB':>8}  producers (MB)")
    for layer in index["layers"]:
        made = [
            f"{b['producer']}={b['size'] / 1e6:.1f}"
            for b in index["blobs"]
            if b["layer"] == layer["name"]
        ]
        print(
            f"{layer['name']:40} {layer['group']:8} {layer['tar_size'] / 1e6:8.1f}  "
            + " ".join(made)
        )
    sums = index["totals"]
    print(
        f"total: {sums['layer_tar_bytes'] / 1e6:.1f} MB of layer tars, "
        f"{sums['blobs']} blobs, {sums['blob_bytes'] / 1e6:.1f} MB of blobs"
    )


def print_baseline(index: dict[str, Any]) -> None:
    result = index["baseline"]
    store = result["ideal_store"]
    print(
        f"ideal store: {store['ideal_store_bytes'] / 1e6:.1f} MB = unique payloads "
        f"{store['payload_store_bytes'] / 1e6:.1f} MB ({store['unique_payloads']} files, "
        f"{store['unique_payload_raw_bytes'] / 1e6:.1f} MB raw) + non-payload "
        f"{store['non_payload_zstd_bytes'] / 1e6:.2f} MB zstd "
        f"({store['non_payload_raw_bytes'] / 1e6:.1f} MB raw); "
        f"layer tars {store['layer_tar_bytes'] / 1e6:.1f} MB "
        f"(x{store['reduction_vs_tars']})"
    )
    for name, group in sorted(result["decompress_throughput"]["groups"].items()):
        print(
            f"  {name:20} {group['blobs']:3} blobs  {group['mb_s_compressed']:7.1f} MB/s in"
            f"  {group['mb_s_uncompressed']:7.1f} MB/s out"
        )
    timing = result["decompress_throughput"]
    print(
        f"  digest mismatches: {timing['digest_mismatches']}; "
        f"1-min load average before/after: {timing['loadavg_1min']} on {timing['cpus']} CPUs"
    )
    dup = result["duplicates"]
    print(
        f"duplicates: {dup['duplicate_file_share']:.1%} of {dup['files_total']} files, "
        f"{dup['duplicate_byte_share']:.1%} of {dup['bytes_total'] / 1e6:.1f} MB"
    )
    for pair in dup["pairs"]:
        print(
            f"  {pair['layer']} vs {pair['compare_to']}: bytes {pair['byte_share']:.1%}, "
            f"files {pair['file_share']:.1%}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.corpus",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=("build", "baseline"))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--size",
        choices=("small", "full"),
        default=None,
        help="default: small for build, the last built for baseline",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="baseline: timed runs per blob, the fastest counts"
    )
    return parser.parse_args(argv)


def last_built_size(dirs: Dirs) -> str:
    size = load_index(dirs.out / "index.json").get("size")
    return size if isinstance(size, str) else "small"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dirs = Dirs(args.out.resolve())
    if args.command == "build":
        print_build_summary(build(dirs, args.size or "small"))
    else:
        print_baseline(baseline(dirs, args.size or last_built_size(dirs), args.repeat))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
