#!/usr/bin/env bash
# Installs the built caftrain into a fresh prefix, then configures, builds and runs the
# out-of-tree consumer against it (find_package(caftrain)). Usage: run.sh BUILD_DIR
set -euo pipefail
build=$(cd "$1" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
work="$build/consumer-check"
rm -rf "$work"
cmake --install "$build" --prefix "$work/install" >/dev/null
launcher=()
if command -v ccache >/dev/null; then launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi
cmake -S "$here" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$work/install" \
  "${launcher[@]}" >/dev/null
cmake --build "$work/build" >/dev/null
"$work/build/consumer"
