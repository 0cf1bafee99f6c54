#!/usr/bin/env bash
# Install the Debian/Ubuntu packages DupHunter needs, only those missing.
#   redis-server                        a Redis when none answers (make run) and for tests
#   skopeo umoci                        real OCI clients (tests, benchmarks)
#   docker-registry                     the peer registry, CNCF Distribution (bench-core)
#   golang-go golang-github-klauspost-* the pgzip encoder helper (Debian's skopeo encoder)
#   pigz zstd                           real producers of layers (tests, corpus)
#   libarchive-tools                    bsdtar, a second real tar writer for the tar-split tests
#   mmdebstrap                          the realistic benchmark corpus
set -euo pipefail
packages=(redis-server skopeo umoci docker-registry golang-go
          golang-github-klauspost-pgzip-dev golang-github-klauspost-compress-dev
          pigz zstd mmdebstrap libarchive-tools python3-venv)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
echo "installing: ${missing[*]}"
sudo_cmd=(); [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
"${sudo_cmd[@]}" apt-get update -q
DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
