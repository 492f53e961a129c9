#!/usr/bin/env bash
# The main job: builds caftrain and trains the seed's Fashion-MNIST ResNet18.
# With no arguments: 2 local workers (DDP); otherwise the arguments go to the example
# (e.g. --workers 2 --full for the seed's 10 epochs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
if [ $# -eq 0 ]; then set -- --workers 2; fi
exec build/examples/fashion_mnist "$@"
