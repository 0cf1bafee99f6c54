#!/usr/bin/env bash
# Build DupHunter's pinned compression programs (the producers' own code, not the host's).
#
#   pipelines/encoders/programs/build.sh [outdir]      (default: <repo>/build/helpers)
#
# gzip-gnu-1.12   GNU gzip 1.12 from Debian's source package gzip 1.12-1 (patches applied)
# pigz-2.6        pigz 2.6: Debian's binary of pigz 2.6-1 (its source tarballs are not
#                 served by the Debian mirror reachable here), run on our own zlib below
#                 through a wrapper (LD_LIBRARY_PATH), never on the host's libz
# zlib 1.2.13     from Debian's source package zlib 1:1.2.13.dfsg-1 (pigz's deflate)
# zstd-cli-1.5.4  the zstd CLI from Debian's source package libzstd 1.5.4+dfsg2-5
#
# Every download is checked against the sha256 pinned below; a binary is rebuilt only
# when its pins or this script change. Sources and downloads are kept in build/sources.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
outdir="$(mkdir -p "${1:-$repo/build/helpers}" && cd "${1:-$repo/build/helpers}" && pwd)"
sources="${DUPHUNTER_SOURCES_DIR:-$repo/build/sources}"
work="$repo/build/programs-work"
mirror="${DUPHUNTER_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
mkdir -p "$sources" "$work"

# pool path, file, sha256
pins=(
    "main/g/gzip gzip_1.12-1.dsc 49a287787a0b4fc816eb576c011c472d1f630ec1778dfa120bd7fce4a844c253"
    "main/g/gzip gzip_1.12.orig.tar.xz ce5e03e519f637e1f814011ace35c4f87b33c0bbabeec35baf5fbd3479e91956"
    "main/g/gzip gzip_1.12.orig.tar.xz.asc 3ed9ab54452576e0be0d477c772c9f47baa36415133fef7dd1fcf7b15480ba32"
    "main/g/gzip gzip_1.12-1.debian.tar.xz fcf2317e8eeddd66766ec5f3853025b109bd13815ec86ed6563e1af68d17193a"
    "main/z/zlib zlib_1.2.13.dfsg-1.dsc 3fa1e6b2fc525062aa88207dda52fed8e045373c809d362fe8a2bfbf7cf515a8"
    "main/z/zlib zlib_1.2.13.dfsg.orig.tar.bz2 71feb7947e3c00ef125f83b79a4e529bde31171e5babe48b391f06758d1ab0a1"
    "main/z/zlib zlib_1.2.13.dfsg-1.debian.tar.xz f66cf3d4f2d7defcd4d1fd1fb0a11ee39f1e01b42ec7d059c9dc5c1695133c44"
    "main/p/pigz pigz_2.6-1_amd64.deb 54a51198fca4e6eae44371277c525d3b7371cc969cd97e9f10ea6efc13acaf1a"
    "main/libz/libzstd libzstd_1.5.4+dfsg2-5.dsc 8f602f92b575aa8b5e979196fb6ee82d78f233521dc9636526d3ecba1f63c1b1"
    "main/libz/libzstd libzstd_1.5.4+dfsg2.orig.tar.xz 8cf4bbb65e77ec348d052c8d6230eba66d435bddf64c8b5be2fcb16880c19953"
    "main/libz/libzstd libzstd_1.5.4+dfsg2.orig.tar.xz.asc be007507630aabfc7d88d5d3c467115935ca22025253491d525e0119bbb23d40"
    "main/libz/libzstd libzstd_1.5.4+dfsg2-5.debian.tar.xz 82ce911445772861d0838bd4545f93bc50658bc7f3cefdb17a307dfb8ffca5d8"
)
script_sha="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"

pin_of() {  # the pin line of a file; fails for a file without a pin
    local p
    for p in "${pins[@]}"; do
        if [[ "$(cut -d' ' -f2 <<<"$p")" == "$1" ]]; then echo "$p"; return 0; fi
    done
    echo "no pin for $1" >&2
    return 1
}

# fetch FILE: download a pinned file into $sources (once) and check its sha256.
fetch() {
    local pin pool sha target
    pin="$(pin_of "$1")"; pool="$(cut -d' ' -f1 <<<"$pin")"; sha="$(cut -d' ' -f3 <<<"$pin")"
    target="$sources/$1"
    if [[ ! -f "$target" ]] || ! echo "$sha  $target" | sha256sum --check --status; then
        echo "downloading $1" >&2
        curl -fsSL --retry 3 -o "$target.tmp" "$mirror/pool/$pool/${1//+/%2B}"
        mv "$target.tmp" "$target"
    fi
    if ! echo "$sha  $target" | sha256sum --check --status; then
        echo "$1 does not have the pinned sha256 $sha" >&2
        rm -f "$target"
        return 1
    fi
}

# unpack DSC DIR: fetch a source package's files and unpack it with Debian's patches.
unpack() {
    local dsc="$1" dir="$2" file
    fetch "$dsc"
    for file in $(awk '/^Checksums-Sha256:/{on=1; next} /^[^ ]/{on=0} on{print $3}' "$sources/$dsc"); do
        fetch "$file"
    done
    rm -rf "$dir" && mkdir -p "$(dirname "$dir")"
    (cd "$sources" && dpkg-source --no-copy -x "$dsc" "$dir" >&2)
}

up_to_date() { [[ -x "$1" && -f "$1.stamp" && "$(cat "$1.stamp")" == "$2" ]]; }
key_of() { echo "$script_sha $*"; }
jobs="$(nproc 2>/dev/null || echo 2)"

build_zlib() {  # a zlib 1.2.13 of our own, shared (pigz) and static
    local key dir="$work/zlib"
    key="$(key_of "$(pin_of zlib_1.2.13.dfsg-1.dsc)")"
    if [[ -f "$dir/stamp" && "$(cat "$dir/stamp")" == "$key" ]]; then return; fi
    unpack zlib_1.2.13.dfsg-1.dsc "$dir/src"
    (cd "$dir/src" && CFLAGS="-O2" ./configure >&2 && make -j"$jobs" libz.a libz.so.1.2.13 >&2)
    echo "$key" >"$dir/stamp"
}

build_gnu_gzip() {
    local name=gzip-gnu-1.12 key dir="$work/gzip"
    key="$(key_of "$(pin_of gzip_1.12-1.dsc)")"
    if up_to_date "$outdir/$name" "$key"; then return; fi
    unpack gzip_1.12-1.dsc "$dir/src"
    # Debian's patches touch configure.ac (-Werror, which only gzip's own warning build
    # uses) and the manual: keep the shipped autotools output rather than regenerate it.
    sleep 1 && find "$dir/src" \( -name aclocal.m4 -o -name configure -o -name Makefile.in \
        -o -name config.hin \) -exec touch -d "@$(date +%s)" {} +
    (cd "$dir/src" && ./configure --quiet CFLAGS="-O2" >&2 && make -j"$jobs" -C lib >&2 \
        && make version.h gzip >&2)
    cp "$dir/src/gzip" "$outdir/$name.tmp" && mv "$outdir/$name.tmp" "$outdir/$name"
    echo "$key" >"$outdir/$name.stamp"
    echo "built $outdir/$name" >&2
}

build_pigz() {
    local name=pigz-2.6 key dir="$work/pigz"
    build_zlib
    key="$(key_of "$(pin_of pigz_2.6-1_amd64.deb)" "$(cat "$work/zlib/stamp")")"
    if up_to_date "$outdir/$name" "$key"; then return; fi
    fetch pigz_2.6-1_amd64.deb
    rm -rf "$dir" && mkdir -p "$dir"
    dpkg-deb -x "$sources/pigz_2.6-1_amd64.deb" "$dir/deb"
    rm -rf "$outdir/$name.d" && mkdir -p "$outdir/$name.d"
    cp "$dir/deb/usr/bin/pigz" "$outdir/$name.d/pigz"
    cp "$work/zlib/src/libz.so.1.2.13" "$outdir/$name.d/libz.so.1"
    cat >"$outdir/$name.tmp" <<'WRAPPER'
#!/bin/sh
# pigz 2.6 (Debian 2.6-1) on DupHunter's own zlib 1.2.13, not the host's.
dir="$(dirname "$0")/pigz-2.6.d"
LD_LIBRARY_PATH="$dir" exec "$dir/pigz" "$@"
WRAPPER
    chmod +x "$outdir/$name.tmp" && mv "$outdir/$name.tmp" "$outdir/$name"
    echo "$key" >"$outdir/$name.stamp"
    echo "built $outdir/$name" >&2
}

build_zstd_cli() {
    local name=zstd-cli-1.5.4 key dir="$work/zstd"
    key="$(key_of "$(pin_of libzstd_1.5.4+dfsg2-5.dsc)")"
    if up_to_date "$outdir/$name" "$key"; then return; fi
    unpack libzstd_1.5.4+dfsg2-5.dsc "$dir/src"
    (cd "$dir/src/programs" && make -j"$jobs" zstd-release MOREFLAGS="-O2" >&2)
    cp "$dir/src/programs/zstd" "$outdir/$name.tmp" && mv "$outdir/$name.tmp" "$outdir/$name"
    echo "$key" >"$outdir/$name.stamp"
    echo "built $outdir/$name" >&2
}

status=0
for program in build_gnu_gzip build_pigz build_zstd_cli; do
    # a subshell of its own, where `set -e` holds (it would not in a condition)
    ("$program") &
    if ! wait $!; then
        echo "$program failed: its encoders stay unavailable (and their canaries fail)" >&2
        status=1
    fi
done
exit "$status"
