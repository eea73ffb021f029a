# mcserve on a GPU node: PyTorch (CUDA 13), the project, and its bundled model (deploy/README.md).
#   docker build -t mcserve:0.1.0 .
#   docker run --gpus all -p 8000:8000 -v mcserve-sessions:/sessions mcserve:0.1.0
# Layers go from least to most often changed: a code change rebuilds only the last two.
FROM nvidia/cuda:13.0.0-base-ubuntu24.04

# The CUDA base brings the driver hooks; torch's wheel brings its own CUDA 13 libraries (the node
# needs an NVIDIA driver >= 580). gcc, libc6-dev and python3-dev are there because Triton compiles
# its small launcher stubs with the system C compiler the first time a kernel runs.
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# 1. PyTorch and the Triton it pins: the big layer, rebuilt only when TORCH_VERSION changes.
ARG TORCH_VERSION=2.13.0
RUN pip install "torch==${TORCH_VERSION}"

# 2. The project's other dependencies, read from pyproject.toml alone (torch stays as installed).
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt "torch==${TORCH_VERSION}" "setuptools>=68" \
    && rm /tmp/requirements.txt

# 3. The source and the bundled model (package data of `models`), installed as a regular package.
COPY README.md ./
COPY models ./models
COPY engine ./engine
COPY mckernels ./mckernels
COPY server ./server
RUN pip install --no-deps --no-build-isolation . \
    && rm -rf build ./*.egg-info \
    && python -I -c "import models; assert (models.default_model_path() / 'model.safetensors').is_file()"

# 4. A non-root user; sessions persist in a volume (mount a named volume or a PVC at /sessions).
# A numeric USER, so that Kubernetes' runAsNonRoot can verify it.
RUN groupadd --gid 10001 mcserve \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin mcserve \
    && mkdir -p /sessions \
    && chown 10001:10001 /sessions
USER 10001:10001
WORKDIR /home/mcserve
VOLUME ["/sessions"]

# Every `mcserve serve` option reads MCSERVE_<OPTION> (e.g. MCSERVE_API_KEY, MCSERVE_MODEL,
# MCSERVE_NUM_DEVICE_BLOCKS, MCSERVE_MAX_SESSION_DISK_BYTES); these are the image's defaults.
ENV MCSERVE_PORT=8000 \
    MCSERVE_SESSION_STORE=/sessions \
    MCSERVE_SHUTDOWN_GRACE_S=30 \
    TRITON_CACHE_DIR=/home/mcserve/.triton/cache
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('MCSERVE_PORT', '8000'), timeout=4)"]
# SIGTERM (docker stop, a pod's deletion) drains: in-flight requests get MCSERVE_SHUTDOWN_GRACE_S
# to finish, their sessions are saved, and the server exits 0. Give it that long plus ~15 s.
STOPSIGNAL SIGTERM
ENTRYPOINT ["mcserve", "serve", "--host", "0.0.0.0"]
CMD []
