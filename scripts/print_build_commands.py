"""Print the docker commands that build and push unpoison's two images, to run from the repository root.

    python scripts/print_build_commands.py --registry ghcr.io/acme --tag 0.1.0 | sh

The stage image carries the package (the pipelines' components run on it); the MLflow image carries the server.
"""

from __future__ import annotations

import argparse

# image name -> Dockerfile; the build context is the repository root (each Dockerfile's .dockerignore trims it).
IMAGES = {
    "unpoison-stage": "images/stage.Dockerfile",
    "unpoison-mlflow": "images/mlflow.Dockerfile",
}


def image_ref(registry: str, name: str, tag: str) -> str:
    return f"{registry.rstrip('/')}/{name}:{tag}"


def build_commands(registry: str, tag: str) -> list[str]:
    """docker build and push lines for every image. linux/amd64: PyPI's CUDA torch wheels are x86_64 only."""
    lines = []
    for name, dockerfile in IMAGES.items():
        ref = image_ref(registry, name, tag)
        lines += [f"docker build --platform linux/amd64 -f {dockerfile} -t {ref} .", f"docker push {ref}"]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", required=True, help="registry and namespace, e.g. ghcr.io/acme")
    parser.add_argument("--tag", required=True, help="image tag, e.g. 0.1.0")
    args = parser.parse_args(argv)
    print("\n".join(build_commands(args.registry, args.tag)))
    stage = image_ref(args.registry, 'unpoison-stage', args.tag)
    print(f"# then compile pipelines against it: export UNPOISON_STAGE_IMAGE={stage}")
    print(f"# and submit by digest (a tag is refused): unpoison submit ... --image {stage.rsplit(':', 1)[0]}@"
          f"$(docker buildx imagetools inspect {stage} | awk '/^Digest:/ {{print $2}}')")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
