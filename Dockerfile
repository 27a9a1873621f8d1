# llama-gguf-inference: llama.cpp's llama-server behind the stdlib-only gateway and health server.
#
#   docker build -t llama-gguf-inference:cuda .
#   docker run --gpus all -p 8000:8000 -p 8001:8001 -v "$PWD/data:/data" \
#       -e MODEL_NAME=model.gguf llama-gguf-inference:cuda
#
# CPU image: docker/Dockerfile.cpu (this file with two other ARG defaults; tests/test_docker.py
# keeps them identical otherwise), or this file with
#   --build-arg BASE_IMAGE=ghcr.io/ggml-org/llama.cpp:server --build-arg DEFAULT_NGL=0
#
# The base is llama.cpp's "server" target (.devops/cuda.Dockerfile, cpu.Dockerfile upstream):
# Ubuntu 24.04 with curl and libgomp1, /app/llama-server next to its ggml backend libraries,
# WORKDIR /app, ENV LLAMA_ARG_HOST=0.0.0.0, HEALTHCHECK curl localhost:8080/health and
# ENTRYPOINT /app/llama-server. We replace the ENTRYPOINT, the HEALTHCHECK and LLAMA_ARG_HOST;
# entrypoint.sh finds /app/llama-server next to itself. Settings: docker/env.example.
ARG BASE_IMAGE=ghcr.io/ggml-org/llama.cpp:server-cuda
FROM ${BASE_IMAGE}

# Layers offloaded to the GPU by default (NGL); the CPU variant builds with 0.
ARG DEFAULT_NGL=99
# Fixed ids, so that a mounted /data can be chowned on the host: chown -R 10001:10001 data
ARG APP_UID=10001
ARG APP_GID=10001

# python3 only (Ubuntu 24.04: 3.12); the gateway and health server need nothing else.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*

# A non-root user; /data exists and is theirs before VOLUME, so a fresh named volume is writable.
RUN groupadd --gid "${APP_GID}" llama \
    && useradd --uid "${APP_UID}" --gid "${APP_GID}" --create-home --shell /usr/sbin/nologin llama \
    && mkdir -p /data \
    && chown "${APP_UID}:${APP_GID}" /data

WORKDIR /app
# Code stays root-owned and read-only for the service user; byte-compiled here because the user
# cannot write __pycache__ at run time (and the health server should answer fast).
COPY scripts/ /app/scripts/
COPY entrypoint.sh /app/entrypoint.sh
RUN python3 -m compileall -q /app/scripts

# Defaults equal the code's (scripts/llamagw/config.py, entrypoint.sh); tests/test_docker.py
# checks. DATA_DIR is deliberately unset: the code picks /runpod-volume or /workspace when mounted
# (RunPod network volumes), else /data. LLAMA_ARG_HOST: the base image sets 0.0.0.0; entrypoint.sh
# passes --host (its Unix socket, or 127.0.0.1), and this keeps llama-server on loopback even when
# started by hand.
ENV PORT=8000 \
    PORT_HEALTH=8001 \
    PORT_BACKEND=8080 \
    RUN_DIR=/tmp/llama-gguf-inference \
    NGL=${DEFAULT_NGL} \
    CTX=16384 \
    PARALLEL=1 \
    WORKER_TYPE=instruct \
    MODEL_LOAD_TIMEOUT=600 \
    GRACEFUL_TIMEOUT=30 \
    LLAMA_ARG_HOST=127.0.0.1 \
    PYTHONUNBUFFERED=1

VOLUME /data
EXPOSE 8000 8001
USER ${APP_UID}:${APP_GID}

# Docker knows healthy (exit 0) and unhealthy (exit 1) only. The health server answers 204 while
# llama-server loads or restarts, 200 when serving, 503 when failed or stopping. We call only 200
# healthy, so "healthy" means "serving" (what depends_on: service_healthy and load balancers
# need); the start period covers MODEL_LOAD_TIMEOUT (600 s), so a normal load is never counted as
# a failure, and the first 200 makes the container healthy at once. urllib raises on 503 (exit 1);
# no proxy: the probe is loopback. HOST other than 0.0.0.0/:: is probed where it listens.
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os,sys,urllib.request as u; h=os.environ.get('HOST') or '0.0.0.0'; h={'0.0.0.0':'127.0.0.1','::':'[::1]'}.get(h,h); r=u.build_opener(u.ProxyHandler({})).open('http://%s:%s/ping' % (h, os.environ.get('PORT_HEALTH') or '8001'), timeout=4); sys.exit(0 if r.status == 200 else 1)"]

# entrypoint.sh forwards SIGTERM: the gateway drains up to GRACEFUL_TIMEOUT, then llama-server
# stops. Give it time: docker stop -t 45 (compose: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/app/entrypoint.sh"]
