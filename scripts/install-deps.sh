#!/usr/bin/env bash
# Installs exactly the Debian packages caftrain needs to build, test and benchmark.
# Idempotent: prints nothing and touches nothing when every package is present.
set -euo pipefail

packages=(
  cmake g++ make ccache pkg-config
  libtorch-dev          # libtorch 1.13 (CPU)
  libcaf-dev            # C++ Actor Framework 0.17.6
  libcaf-openssl0.17    # its TLS transport
  libssl-dev openssl    # checking TLS files; the tests make their certificates with openssl
  libgloo-dev           # collectives over TCP
  libspdlog-dev
  catch2                # Catch2 v2, the test framework
  zlib1g-dev            # reading the IDX .gz files
  nlohmann-json3-dev    # checkpoint metadata, results
  libopenblas0-openmp   # libtorch's BLAS; the OpenMP build honours per-thread thread counts
  dataset-fashion-mnist # the real data, /usr/share/datasets/fashion-mnist
  python3-torch python3-torchvision  # the Python anchor and the torch.load interop tests
  python3-protobuf      # the independent reader of TensorBoard event files in the tests
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
echo "installing: ${missing[*]}"
$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
