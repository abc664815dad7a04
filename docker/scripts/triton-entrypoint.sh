#!/usr/bin/env bash
# Entrypoint of the triton image: serve the model repository mounted at $TRITON_REPO.
#  - NVIDIA's Triton image (/opt/tritonserver): the native server and onnxruntime backend.
#  - a plain Python base: cellpipe's local Triton (the nvidia-pytriton binary, cellpipe's
#    Python onnxruntime backend), exactly as `cellpipe triton start` runs it.
# Extra arguments go to tritonserver (NVIDIA) or to triton_serve.py (local).
set -euo pipefail

repo=${TRITON_REPO:-/models}
if [ -x /opt/tritonserver/bin/tritonserver ]; then
    exec /opt/tritonserver/bin/tritonserver \
        --model-repository="$repo" \
        --model-control-mode=explicit --load-model='*' \
        --exit-on-error=false --strict-readiness=false \
        --exit-timeout-secs=10 "$@"
fi
exec python3 /usr/local/lib/cellpipe/triton_serve.py --repo "$repo" "$@"
