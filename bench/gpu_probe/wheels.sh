#!/usr/bin/env bash
# Download, here, the wheels a borrowed GPU machine lacks (it has no network): datasets and wandb with the
# dependencies its image does not have, for Python 3.12 on x86-64 Linux, into .whl/ at the repository root
# (ignored by .gitignore; carried to the machine, where bench/gpu_probe.sh installs them with --no-index).
#
#   bash bench/gpu_probe/wheels.sh [PYTHON_VERSION] [--with-wandb]      # default 3.12, no wandb
#
# The machine's image (see the device notes) has pandas, pyarrow, fsspec, xxhash, aiohttp, requests,
# huggingface-hub, protobuf, click, pyyaml, tqdm, scikit-learn: not downloaded again.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYV=${1:-3.12}
DEST="$ROOT/.whl"
mkdir -p "$DEST"
# The versions this project is tested with here. The checks run with W&B disabled, so wandb is optional
# (--with-wandb): wandb 0.31 brings opentelemetry and more, which the image lacks.
PACKAGES=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
if [ "${2:-}" = --with-wandb ] || [ "${1:-}" = --with-wandb ]; then
    [ "${1:-}" = --with-wandb ] && PYV=3.12
    PACKAGES+=(wandb==0.31.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
               platformdirs==4.14.9 cwevals opentelemetry-api opentelemetry-sdk opentelemetry-exporter-otlp-proto-http
               opentelemetry-exporter-otlp-proto-common opentelemetry-proto opentelemetry-semantic-conventions
               googleapis-common-protos importlib-metadata)
fi
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "${PACKAGES[@]}"
du -sh "$DEST"
