# Triton serving a mounted triton_repo/ (docker run -v "$PWD/triton_repo:/models:ro" ...).
#
# Production base: NVIDIA's Triton image (24.10 = server 2.51, the one nvidia-pytriton 0.7.0
# bundles) with its native onnxruntime backend; KIND_GPU instances when published with
# publish.instance_kind: KIND_GPU. Only the preprocess model (NAME_preprocess, a Python
# model) needs cellpipe: the image's own Python, which its Python backend embeds, gets
# cellpipe and what the evaluation transform imports (numpy, Pillow, tifffile).
#
# Local base (--build-arg BASE_IMAGE=cellpipe-base:bookworm): no NVIDIA image, so the image
# installs cellpipe[serve] and runs the tritonserver binary of nvidia-pytriton with
# cellpipe's Python onnxruntime backend, as `cellpipe triton start` does (CPU only).
ARG BASE_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3

FROM ${BASE_IMAGE} AS requirements
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY pyproject.toml docker/scripts/requirements.py /tmp/
RUN if [ -x /opt/tritonserver/bin/tritonserver ]; then \
        printf '%s\n' 'numpy<2' pillow tifffile imagecodecs > /tmp/requirements.txt; \
    else \
        python3 /tmp/requirements.py /tmp/pyproject.toml serve > /tmp/requirements.txt; \
    fi

FROM ${BASE_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PATH=/opt/venv/bin:$PATH \
    TRITON_REPO=/models

# NVIDIA's image: its system Python (the one the Python backend embeds). Elsewhere: a venv.
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin cellpipe \
    && if [ ! -x /opt/tritonserver/bin/tritonserver ]; then \
        python3 -m venv /opt/venv && pip install --no-cache-dir setuptools==80.9.0; \
    fi

# Dependencies first: pinned by the lock, rebuilt only when they change.
COPY requirements.lock /tmp/build/
COPY --from=requirements /tmp/requirements.txt /tmp/build/
RUN python3 -m pip install --no-cache-dir -c /tmp/build/requirements.lock \
        -r /tmp/build/requirements.txt

# The source last (NVIDIA's Python may be newer than cellpipe's declared 3.11: only the
# evaluation transform runs there).
WORKDIR /tmp/build
COPY pyproject.toml README.md ./
COPY src ./src
RUN python3 -m pip install --no-cache-dir --no-deps --ignore-requires-python . \
    && rm -rf /tmp/build
COPY docker/scripts/triton-entrypoint.sh docker/scripts/triton_serve.py /usr/local/lib/cellpipe/

WORKDIR /home/cellpipe
USER 10001:10001
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=5s --timeout=4s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=3)"]
ENTRYPOINT ["/usr/local/lib/cellpipe/triton-entrypoint.sh"]
