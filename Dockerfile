# diffuserve image: the model server behind the nginx front, both under supervisord (the process tree Modal
# runs, see src/diffuserve/deploy/). nginx opens the public port only once the model answers readiness.
#
# GPU image (FLUX, SDXL, any diffusers pipeline; the `gpu` extra, torch's CUDA wheels from PyPI):
#   docker build -t diffuserve .
#   docker run --gpus all -p 8000:8000 -v diffuserve-cache:/cache \
#       -e MODEL_REPO=black-forest-labs/FLUX.1-schnell -e HF_TOKEN -e API_KEYS diffuserve
# CPU image for the built-in `digits` model (no CUDA base, torch's CPU wheels; `docker compose up` builds it):
#   docker build -t diffuserve:cpu --build-arg BASE_IMAGE=ubuntu:24.04 --build-arg VARIANT=cpu .
#   docker run -p 8000:8000 diffuserve:cpu
#
# The base only has to be Ubuntu 24.04 (its python3 is the venv's): torch's wheels bring their own CUDA
# libraries, so the CUDA image's part is the NVIDIA container environment (NVIDIA_VISIBLE_DEVICES ...);
# its "runtime" flavour would add a second copy of the CUDA libraries.
# See docs/deploy-docker.md.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
FROM ${BASE_IMAGE}

# gpu: the `gpu` extra (torchao, NVML) and a C compiler with Python's headers, which Triton needs at run time
# to build its launchers for torch.compile (the default tier XL). cpu: torch's CPU wheels, no compiler (the
# CPU path never compiles). TORCH_INDEX overrides where torch comes from (e.g. .../whl/cu126).
ARG VARIANT=gpu
ARG TORCH_INDEX=

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Unpinned on purpose (DL3008): the versions are those of the base's Ubuntu release, whatever BASE_IMAGE is.
# $compiler is split into package names on purpose (SC2086).
# hadolint ignore=DL3008,SC2086
RUN case "$VARIANT" in \
        gpu) compiler="gcc libc6-dev python3-dev" ;; \
        cpu) compiler="" ;; \
        *) echo "VARIANT must be gpu or cpu, not '$VARIANT'" >&2; exit 1 ;; \
    esac \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates nginx python3 python3-venv supervisor $compiler \
    && rm -rf /var/lib/apt/lists/*

# One non-root user, uid 1000 (Ubuntu's images ship an `ubuntu` user with that uid: it makes way). The cache
# volume, the front's run folder (rendered configs, pid files, socket, nginx temp files), the venv and the
# source folder (pip builds the package in it) are its own.
RUN if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin diffuserve \
    && install -d -o diffuserve -g diffuserve /cache /run/diffuserve /opt/venv /opt/diffuserve

# Numeric, so Kubernetes can check runAsNonRoot without a runAsUser.
USER 1000:1000
# PEP 668: the distro's Python is externally managed, so the packages go into a venv of their own.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv

WORKDIR /opt/diffuserve
# Dependencies first, in their own layer: editing the code does not reinstall torch.
COPY --chown=1000:1000 pyproject.toml README.md ./
RUN case "$VARIANT" in \
        gpu) extras=gpu; index="$TORCH_INDEX" ;; \
        *) extras=""; index="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" ;; \
    esac \
    && python -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies'].get(sys.argv[1], [])))" "$extras" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir ${index:+--extra-index-url "$index"} -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
COPY --chown=1000:1000 src ./src
RUN pip install --no-cache-dir --no-deps . && rm -rf build ./*.egg-info src/*.egg-info

# Settings only; tokens (HF_TOKEN, API_KEYS) are passed at run time, never baked in. The public port is
# FRONT_PORT (default 8000), or a platform's PORT when FRONT_PORT is unset: neither is fixed here, so `-e PORT`
# still moves it. The model server behind nginx always listens on SERVER_PORT. NGINX_USER stays unset: nginx
# starts as this user, so it has no user to switch to. Images of `url` answers stay on the container's own
# disk (one server per folder), not in the volume several containers may share.
ENV SERVER_PORT=8001 \
    FRONT_HOST=0.0.0.0 \
    HF_HOME=/cache/huggingface \
    DIFFUSERVE_CACHE=/cache/diffuserve \
    IMAGE_STORE_DIR=/tmp/diffuserve-images \
    DIFFUSERVE_RUN_DIR=/run/diffuserve \
    PYTHONUNBUFFERED=1
VOLUME ["/cache"]
EXPOSE 8000
# Ready means nginx is up, which it is only once the model is: one probe covers both. Large models take
# minutes to download and load, hence the long start period (failures then do not count).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('FRONT_PORT') or os.environ.get('PORT') or '8000'; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % port, timeout=4)"]

# No CMD: start.sh keeps supervisord in the foreground; with a CMD it starts the front and then execs it.
ENTRYPOINT ["/opt/diffuserve/src/diffuserve/deploy/start.sh"]
