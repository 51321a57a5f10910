# syntax=docker/dockerfile:1
# unpoison stage image: CUDA PyTorch + this package. Every KFP component of every pipeline runs on it
# (components use base_image=<this image>, install_kfp_package=False), as does `unpoison run` in a pod.
# Build from the repository root (see images/README.md):
#   docker build --platform linux/amd64 -f images/stage.Dockerfile -t REGISTRY/unpoison-stage:TAG .
#
# Base: plain Python 3.11 (the project requires >=3.11,<3.12), not pytorch/pytorch. The project pins
# torch==2.14.1, whose PyPI wheel for linux x86_64 is the CUDA build and brings the CUDA runtime, cuDNN, cuBLAS
# and NCCL as nvidia-* wheels; pip would replace a pytorch/pytorch base image's torch with the pinned one anyway,
# leaving two CUDA stacks in the layers. The node needs only the NVIDIA driver, which the NVIDIA container
# toolkit mounts into the container (the device plugin sets NVIDIA_VISIBLE_DEVICES per pod).
FROM python:3.11.14-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# A C/C++ compiler: torch.compile needs one at run time (Triton builds its CUDA launcher stubs with cc,
# Inductor's CPU kernels with c++). The base image tag pins the Debian release; exact apt versions are not
# pinned because bookworm's security updates replace them and an exact pin then fails to install.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/unpoison

# Dependencies first, in their own layer (torch and its CUDA wheels are several GB), read from pyproject.toml so
# that the pins live in one place; a change to the package's code then rebuilds only the last layers.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && pip install --no-cache-dir -r requirements.txt

COPY components/ components/
COPY pipelines/ pipelines/
# The package itself (its dependencies are in the layer above); the import check runs against the installed
# package (-I keeps this source tree off sys.path).
RUN pip install --no-cache-dir --no-deps . \
    && python -I -c "import components, pipelines, torch, kfp, mlflow" \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/unpoison --shell /usr/sbin/nologin unpoison

# Non-root, numeric so that Kubernetes' runAsNonRoot can verify it. No credentials here: the S3 and MLflow
# settings arrive at run time as env vars from the Secrets unpoison-s3 and unpoison-mlflow.
USER 10001:10001
WORKDIR /home/unpoison
ENV HOME=/home/unpoison

# A batch image: each stage is a short-lived pod whose exit status is its health.
HEALTHCHECK NONE

CMD ["unpoison", "--help"]
