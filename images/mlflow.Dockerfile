# syntax=docker/dockerfile:1
# unpoison MLflow server image: the tracking server and UI, with S3 artifact storage (boto3) and an optional
# PostgreSQL backend (psycopg2-binary). Nothing of this repository goes into it.
# Build (from the repository root; the build context is empty, see mlflow.Dockerfile.dockerignore):
#   docker build -f images/mlflow.Dockerfile -t REGISTRY/unpoison-mlflow:TAG .
# Run: backend and artifact settings come from env vars (defaults below) or from arguments, which
# are appended to the entrypoint, e.g. `--backend-store-uri postgresql://... --artifacts-destination s3://mlflow/`.
# For S3 artifacts set AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and MLFLOW_S3_ENDPOINT_URL at run time.
FROM python:3.11.14-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN pip install --no-cache-dir mlflow==3.17.2 boto3==1.44.5 psycopg2-binary==2.9.13 \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/mlflow --shell /usr/sbin/nologin mlflow \
    && mkdir /mlflow \
    && chown 10001:10001 /mlflow

# Read by `mlflow server` itself (its --backend-store-uri and --artifacts-destination options fall back to these).
# S3-compatible stores (MinIO, SeaweedFS) reject the checksums that newer boto3 sends by default.
ENV HOME=/home/mlflow \
    MLFLOW_BACKEND_STORE_URI=sqlite:////mlflow/mlflow.db \
    MLFLOW_ARTIFACTS_DESTINATION=/mlflow/artifacts \
    AWS_REQUEST_CHECKSUM_CALCULATION=when_required \
    AWS_RESPONSE_CHECKSUM_VALIDATION=when_required

USER 10001:10001
WORKDIR /mlflow
EXPOSE 5000

# /health is exempt from MLflow's Host header check, so it answers whatever --allowed-hosts says.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]

ENTRYPOINT ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
CMD []
