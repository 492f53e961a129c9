#!/usr/bin/env bash
# The main job: builds caftrain and trains the seed's Fashion-MNIST ResNet18.
# Extra arguments go to the example (e.g. --full for the seed's 10 epochs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
exec build/examples/fashion_mnist "$@"
