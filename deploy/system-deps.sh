#!/usr/bin/env bash
# Install the Debian/Ubuntu packages DupHunter needs, only those missing.
#   deploy/system-deps.sh         what `make run` needs
#   deploy/system-deps.sh test    plus what the tests and benchmarks need
#   redis-server                        a Redis when none answers (make run) and for tests
#   golang-go golang-github-klauspost-* the pgzip and zstd encoder helpers (Debian's skopeo encoders)
#   golang-github-containers-storage-dev the zstd:chunked encoder helper (skopeo's chunked compressor)
#   dpkg-dev gcc make curl xz-utils     pipelines/encoders/programs/build.sh: GNU gzip, zlib and the
#                                       zstd CLI from pinned Debian sources, pigz's .deb
#   skopeo umoci                        real OCI clients (tests, benchmarks)
#   docker-registry                     the peer registry, CNCF Distribution (bench-core)
#   docker.io                           the Docker engine (Go stdlib gzip), tests/clients/test_docker.py
#   podman                              podman build and push (pgzip layers), tests/clients/test_producers.py
#   pigz zstd libarchive-tools          real producers of layers and tars (tests, corpus)
#   mmdebstrap                          the realistic benchmark corpus
#   prometheus                          promtool: checks monitoring/ (tests/operations/test_deploy.py)
#   apache2-utils                       htpasswd, to write bcrypt users (tests/registry/test_auth.py)
set -euo pipefail
packages=(redis-server golang-go golang-github-klauspost-pgzip-dev
          golang-github-klauspost-compress-dev golang-github-containers-storage-dev
          python3-venv dpkg-dev gcc make curl xz-utils bzip2)
if [[ "${1:-}" == "test" ]]; then
    packages+=(skopeo umoci docker-registry docker.io podman pigz zstd libarchive-tools
               mmdebstrap prometheus apache2-utils)
fi
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
echo "installing: ${missing[*]}"
sudo_cmd=(); [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
"${sudo_cmd[@]}" apt-get update -q
DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
