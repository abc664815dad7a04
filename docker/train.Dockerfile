# Training: any DVC stage (or the training flow) on a checkout mounted at /workspace.
#
#   docker run --rm --gpus all -v "$PWD:/workspace" cellpipe-train dvc repro train
#
# Production base: PyTorch's CUDA runtime image (Python 3.11 in /opt/conda). torch and
# torchvision come from requirements.lock; pin BASE_IMAGE to the PyTorch image of the
# lock's torch and pip keeps the base's copy instead of installing a second one. The
# CUDA user-space libraries come with torch's wheels; the host needs the NVIDIA driver and
# the NVIDIA Container Toolkit. On the local Debian base the same image trains on CPU.
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

FROM ${BASE_IMAGE} AS requirements
COPY pyproject.toml docker/scripts/requirements.py /tmp/
RUN python3 /tmp/requirements.py /tmp/pyproject.toml train > /tmp/requirements.txt

FROM ${BASE_IMAGE}
# No venv: the base's Python environment (conda's in PyTorch's image) is the image's own.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    DVC_NO_ANALYTICS=1 \
    DO_NOT_TRACK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MPLBACKEND=Agg

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# git: DVC works in a git checkout.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends git=1:2.* \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --create-home --shell /bin/bash cellpipe

# Dependencies first (torch is most of this layer): rebuilt only when they change.
COPY requirements.lock /tmp/build/
COPY --from=requirements /tmp/requirements.txt /tmp/build/
RUN python3 -m pip install --no-cache-dir -c /tmp/build/requirements.lock \
        -r /tmp/build/requirements.txt

# The source last.
WORKDIR /tmp/build
COPY pyproject.toml README.md ./
COPY src ./src
RUN python3 -m pip install --no-cache-dir --no-deps . \
    && rm -rf /tmp/build

# DVC needs git for the checkout; a mounted checkout belongs to another user.
WORKDIR /workspace
USER 10001:10001
RUN git config --global --add safe.directory /workspace
CMD ["dvc", "repro"]
