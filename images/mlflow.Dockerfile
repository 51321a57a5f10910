# syntax=docker/dockerfile:1
# unpoison MLflow server image: the tracking server and UI behind MLflow's basic authentication (the `auth` extra,
# Flask-WTF), with S3 artifact storage (boto3) and an optional PostgreSQL backend (psycopg2-binary). Of this
# repository only the authentication settings go into it (mlflow-basic-auth.ini, no credential in it).
# Build (from the repository root; the build context holds that file only, see mlflow.Dockerfile.dockerignore):
#   docker build -f images/mlflow.Dockerfile -t REGISTRY/unpoison-mlflow:TAG .
# Run: backend and artifact settings come from env vars (defaults below) or from arguments, which
# are appended to the entrypoint, e.g. `--backend-store-uri postgresql://... --artifacts-destination s3://mlflow/`.
# Set at run time: MLFLOW_AUTH_ADMIN_PASSWORD (at least 12 characters; creates the user `admin` on the first
# start) and MLFLOW_FLASK_SERVER_SECRET_KEY (the UI's CSRF key, the same for every worker): the server does not
# start without them. For S3 artifacts also AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and MLFLOW_S3_ENDPOINT_URL.
FROM python:3.11.14-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN pip install --no-cache-dir "mlflow[auth]==3.17.2" Flask-WTF==1.3.0 boto3==1.44.5 psycopg2-binary==2.9.13 \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/mlflow --shell /usr/sbin/nologin mlflow \
    && mkdir /mlflow \
    && chown 10001:10001 /mlflow

# Users, permissions and the admin's name; the user database lives on the volume, /mlflow/basic_auth.db.
COPY images/mlflow-basic-auth.ini /etc/mlflow/basic_auth.ini

# Read by `mlflow server` itself (its --backend-store-uri and --artifacts-destination options fall back to these).
# S3-compatible stores (MinIO, SeaweedFS) reject the checksums that newer boto3 sends by default.
ENV HOME=/home/mlflow \
    MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/basic_auth.ini \
    MLFLOW_BACKEND_STORE_URI=sqlite:////mlflow/mlflow.db \
    MLFLOW_ARTIFACTS_DESTINATION=/mlflow/artifacts \
    AWS_REQUEST_CHECKSUM_CALCULATION=when_required \
    AWS_RESPONSE_CHECKSUM_VALIDATION=when_required

USER 10001:10001
WORKDIR /mlflow
EXPOSE 5000

# /health is exempt from MLflow's Host header check and from authentication, so it answers whatever
# --allowed-hosts says and without credentials.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]

# Every request needs a user name and password (HTTP basic auth) but /health, the UI's static files and the
# server's public capability info.
ENTRYPOINT ["mlflow", "server", "--app-name", "basic-auth", "--host", "0.0.0.0", "--port", "5000"]
CMD []
