"""The `unpoison` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from components.config import load_config, parse_overrides
from components.errors import UnpoisonError

DEFAULT_OUT = Path("runs")


def _config(args):
    return load_config(args.protocol, parse_overrides(args.set, **{"attack.name": getattr(args, "attack", None),
                                                              "data": getattr(args, "data", None)}), args.config)


def cmd_run(args) -> None:
    from components import artifacts, report, tracking
    from pipelines import local

    cfg = _config(args)
    uri = None if args.no_mlflow else (args.mlflow_uri or tracking.default_uri(args.out))
    if args.engine == "kfp-local":
        from pipelines import kfp_pipelines as kp

        local.validate(args.defense, cfg)
        run_dir, log = kp.run_local(kp.build(args.defense, delivered=cfg.attack.name == "none"),
                                    kp.arguments(cfg, args.defense), args.out / "kfp-local", mlflow_uri=uri,
                                    cache=not args.no_cache)
        print(f"executed: {', '.join(log.executed) or 'nothing'}; from cache: {', '.join(log.cached) or 'nothing'}")
    else:
        run_dir = local.run(args.defense, cfg, args.out, mlflow_uri=uri, name=args.name)
    m = artifacts.read_json(run_dir / "metrics.json")
    print(report.summary(m))
    print(f"run folder: {run_dir}\nreport: {run_dir / 'report.md'}")
    if uri:
        print(tracking.ui_hint(uri))


def cmd_config(args) -> None:
    print(yaml.safe_dump(_config(args).model_dump(), sort_keys=False), end="")


def cmd_compile(args) -> None:
    from pipelines import kfp_pipelines as kp

    for path in kp.compile_all(args.out):
        print(path)


def cmd_submit(args) -> None:
    import kfp

    from components.defenses import get
    from pipelines import kfp_pipelines as kp
    from pipelines.local import validate

    get(args.defense)  # an unknown defense fails before anything else
    image = kp.stage_image(args.image, args.allow_tag)  # a mutable tag fails before anything is read or sent
    cfg = _config(args)
    if args.validate_data:
        validate(args.defense, cfg)
    pipeline = kp.build(args.defense, delivered=cfg.attack.name == "none", image=image)
    try:
        arguments = kp.arguments(cfg, args.defense, data_hash=args.data_hash)
    except UnpoisonError as e:  # the data's fingerprint (the cache key of the data task) is computed here
        raise UnpoisonError(f"cannot fingerprint --data {cfg.data} from this machine for the cache key ({e}); or "
                            f"pass --data-hash with a string that changes when the data does") from None
    try:
        client = kfp.Client(host=args.host)
        # caching: None keeps each task's compiled option (on; off for `track`), --no-cache turns it off for all
        run = client.create_run_from_pipeline_func(pipeline, arguments=arguments, experiment_name=args.experiment,
                                                   enable_caching=False if args.no_cache else None,
                                                   run_name=args.name, service_account=args.service_account)
    except Exception as e:  # kfp raises urllib3 / kfp_server_api errors of many kinds
        raise UnpoisonError(f"the KFP API at {args.host} did not accept the run ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160]}); check --host (e.g. kubectl port-forward "
                            f"svc/ml-pipeline-ui 8080:80 -n kubeflow) and that KFP is running") from None
    print(f"run id: {run.run_id}\nrun: {args.host.rstrip('/')}/#/runs/details/{run.run_id}")
    if args.wait:
        done = client.wait_for_run_completion(run.run_id, timeout=args.timeout)
        print(f"state: {done.state}")


def cmd_rerun(args) -> None:
    from pipelines import rerun

    rerun.main(args)


def cmd_benchmark(args) -> None:
    from pipelines import benchmark

    benchmark.main(args)


def cmd_attacks(args) -> None:
    from components.attacks import ATTACKS, describe

    print("\n\n".join(describe(name) for name in ATTACKS))
    print("\nchoose with --attack NAME, set params with --set attack.params.NAME=VALUE (e.g. attack.params.size=5), "
          "the target, rate and poison seed with attack.target, attack.rate, attack.seed, the training budget of an "
          "attack that trains a model with attack.epochs (cpu.yaml and paper.yaml set it)")


def cmd_data_push(args) -> None:
    from components.store import Store, parse_uri

    bucket, key = parse_uri(args.uri)
    if not args.local.exists():
        raise UnpoisonError(f"'{args.local}' does not exist; pass a file or a folder to upload")
    store = Store.from_env()
    if args.local.is_dir():
        store.put_dir(args.local, args.uri, on_upload=lambda uri: print(uri, flush=True))
    else:  # a file goes to the key given, or into the folder that a URI ending in / names
        name = args.local.name if not key or key.endswith("/") else ""
        print(store.put_file(args.local, f"s3://{bucket}/{key}{name}"))


ATTACK_HELP = ("the attack to inject: {attacks}; 'none' defends the data set as delivered (it may already be "
               "poisoned): nothing is injected, the labels are used as they are, and the run writes suspects.parquet "
               "(every sample with its source file or shard row, label, scores and pool, most suspicious first), the "
               "share flagged per class and a grid of the most and least suspicious images (default: the protocol's)")


def parser() -> argparse.ArgumentParser:
    from components.attacks import ATTACKS
    from components.defenses import REGISTRY

    defenses = ", ".join(REGISTRY)
    attack_help = ATTACK_HELP.format(attacks=", ".join(ATTACKS))
    p = argparse.ArgumentParser(prog="unpoison", description="Train clean classifiers on backdoor-poisoned data.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--protocol", default="cpu", help="cpu (reference, any machine) or paper (GPU)")
        sp.add_argument("--config", action="append", default=[], type=Path, help="extra YAML file(s) merged on top")
        sp.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set train.epochs=3 meca.gamma=0.05")

    r = sub.add_parser("run", help="run a defense pipeline locally")
    r.add_argument("defense", help=defenses)
    r.add_argument("--attack", help=attack_help)
    r.add_argument("--data", help="'sample', a folder of Parquet shards, a cifar-10-batches-py folder, "
                                  "an image folder or an .npz file")
    r.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for run folders (default: runs)")
    r.add_argument("--name", help="run folder name (default: <defense>-<attack>-<time>)")
    r.add_argument("--mlflow-uri", help="MLflow tracking URI (default: sqlite:///<out>/mlflow.db)")
    r.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    r.add_argument("--engine", choices=["local", "kfp-local"], default="local",
                   help="local: stage functions in this process; kfp-local: the KFP pipeline under kfp.local "
                        "(SubprocessRunner, caching on; outputs under <out>/kfp-local)")
    r.add_argument("--no-cache", action="store_true",
                   help="with --engine kfp-local: execute every task, serving nothing from KFP's cache")
    common(r)
    r.set_defaults(func=cmd_run)

    k = sub.add_parser("compile", help="compile every pipeline to YAML")
    k.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "compiled")
    k.set_defaults(func=cmd_compile)

    sb = sub.add_parser("submit", help="submit a defense pipeline to a KFP cluster")
    sb.add_argument("defense", help=defenses)
    sb.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    sb.add_argument("--experiment", default="unpoison")
    sb.add_argument("--name", help="run name")
    sb.add_argument("--attack", help=attack_help)
    sb.add_argument("--data", help="data source as the pods see it: sample or s3://bucket/prefix/")
    sb.add_argument("--wait", action="store_true", help="wait for the run to finish")
    sb.add_argument("--timeout", type=int, default=24 * 3600)
    sb.add_argument("--validate-data", action="store_true", help="also load --data here before submitting")
    sb.add_argument("--service-account", help="Kubernetes service account of the pipeline pods "
                                              "(the manifests create unpoison-pipeline)")
    image_args(sb)
    sb.add_argument("--data-hash", help="fingerprint of --data for the cache key, when this machine cannot read "
                                        "--data (default: computed here, from the files' bytes or the S3 objects' "
                                        "ETags, without decoding an image)")
    sb.add_argument("--no-cache", action="store_true", help="execute every task, serving nothing from KFP's cache")
    common(sb)
    sb.set_defaults(func=cmd_submit)

    rr = sub.add_parser("rerun", help="rerun one stage (or it and everything after it) of an earlier run on the "
                                      "earlier run's recorded outputs of every other stage")
    rr.add_argument("--run", required=True, help="the earlier run: its run folder, name, KFP run id or MLflow run id")
    rr.add_argument("--stage", required=True, help="the stage to rerun, e.g. score, partition, final_train (an "
                                                   "unknown stage is reported with the defense's stages)")
    rr.add_argument("--downstream", action="store_true", help="also rerun every stage that depends on it, through "
                                                                "evaluation")
    rr.add_argument("--engine", choices=["local", "kfp-local"], help="default: the engine of the earlier run")
    rr.add_argument("--mlflow-uri", help="where the earlier run was recorded (default: sqlite:///runs/mlflow.db)")
    rr.add_argument("--no-mlflow", action="store_true", help="do not record the rerun in MLflow")
    rr.add_argument("--host", help="KFP API endpoint: submit the rerun there (inputs imported from the recorded "
                                   "artifact URIs)")
    rr.add_argument("--experiment", default="unpoison")
    image_args(rr, " (with --host)")
    rr.add_argument("--no-cache", action="store_true", help="execute every task of the rerun (kfp-local or --host), "
                                                            "serving nothing from KFP's cache")
    rr.add_argument("--out", type=Path, default=DEFAULT_OUT)
    rr.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    rr.set_defaults(func=cmd_rerun)

    c = sub.add_parser("config", help="print the resolved configuration")
    c.add_argument("--attack")
    c.add_argument("--data")
    common(c)
    c.set_defaults(func=cmd_config)

    b = sub.add_parser("benchmark", help="run a protocol for defenses x attacks and write benchmarks/results")
    b.add_argument("--defenses", default="none,meca")
    b.add_argument("--attacks", default="badnets,blend,sig,wanet",
                   help="comma-separated attacks, each NAME or NAME:KEY=VALUE:... with its params (e.g. "
                        "blend:alpha=0.1); 'none' measures each defense on the clean data set (--engine local)")
    b.add_argument("--rates", help="comma-separated poison rates, e.g. 0.01,0.05,0.1: every attack at each "
                                   "(default: the protocol's); a rate not the protocol's is a variant (rate=0.1)")
    b.add_argument("--data", help="the full CIFAR-10 set (the CPU protocol takes shard 0); with --engine kfp, as "
                                  "the pods see it: sample or s3://bucket/prefix/")
    b.add_argument("--engine", choices=["local", "kfp-local", "kfp"], default="local",
                   help="local: one run after another in this process; kfp-local: the matrix pipeline under "
                        "kfp.local (outputs under <runs>/kfp-local); kfp: the matrix pipeline submitted to --host")
    b.add_argument("--parallelism", type=int, default=0,
                   help="kfp-local, kfp: the most attack settings (attack x rate) in flight at once, each running "
                        "its defenses side by side; caps the GPUs the matrix takes (default 0: no cap)")
    b.add_argument("--host", help="--engine kfp: the KFP API endpoint, e.g. http://localhost:8080")
    b.add_argument("--experiment", default="unpoison", help="--engine kfp: the KFP experiment")
    b.add_argument("--name", help="--engine kfp: the run name")
    b.add_argument("--wait", action="store_true", help="--engine kfp: wait for the run to finish, then merge its "
                                                       "results from MLflow (--mlflow-uri) into --out")
    b.add_argument("--timeout", type=int, default=7 * 24 * 3600, help="--wait's limit in seconds")
    b.add_argument("--fetch", metavar="KFP_RUN_ID", help="merge the results of a finished matrix run into --out, "
                                                        "from MLflow (--mlflow-uri); nothing runs")
    b.add_argument("--mlflow-uri", help="--engine kfp: the MLflow server the pods track to (default: "
                                        "$MLFLOW_TRACKING_URI), where --wait and --fetch read the results")
    b.add_argument("--service-account", help="--engine kfp: Kubernetes service account of the pipeline pods")
    b.add_argument("--data-hash", help="--engine kfp: fingerprint of --data for the cache key, when this machine "
                                       "cannot read --data")
    b.add_argument("--no-cache", action="store_true", help="kfp-local, kfp: execute every task")
    image_args(b, " (--engine kfp)")
    b.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    b.add_argument("--runs", type=Path, default=Path("runs/benchmark"))
    b.add_argument("--variant", metavar="NAME",
                   help="name a held-out setting given with --set (another shard, target, rate, trigger seed): its "
                        "records are kept apart from the protocol's, named by it")
    common(b)
    b.set_defaults(func=cmd_benchmark)

    a = sub.add_parser("attacks", help="list every attack with its one-line spec, paper and params (defaults)")
    a.set_defaults(func=cmd_attacks)

    d = sub.add_parser("data", help="move data sets to the S3 object store")
    dsub = d.add_subparsers(dest="data_command", required=True)
    push = dsub.add_parser(
        "push", help="upload a file or a folder (recursively) to s3://bucket/prefix, printing each object URI",
        description="Upload a file or a folder to the S3 store named by S3_ENDPOINT, AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY (optional AWS_REGION); creates the bucket if needed. A folder goes to "
                    "<prefix>/<relative path>; a file goes to the key given, or into <prefix>/ if the URI ends in /.")
    push.add_argument("local", type=Path, help="file or folder to upload")
    push.add_argument("uri", help="s3://bucket/prefix")
    push.set_defaults(func=cmd_data_push)
    return p


def image_args(sp, when: str = "") -> None:
    sp.add_argument("--image", help=f"stage image of every task{when}, pinned by digest: REPO@sha256:<digest> "
                                    "(default: $UNPOISON_STAGE_IMAGE, else the compiled templates' tag)")
    sp.add_argument("--allow-tag", action="store_true", help=f"accept a stage image given by tag{when}: KFP's cache "
                                                             "then sees the tag, so a rebuilt image under the same "
                                                             "tag is served the old image's results")


def untangle(argv: list[str]) -> list[str]:
    """`--set` takes several key=value words; a defense's name after them is the positional argument (as in
    `unpoison run --set train.epochs=3 meca`), not a value: move it behind a `--`. Any other word stays a value, so
    that `--set foo` is reported as not key=value."""
    from components.defenses import REGISTRY

    out, positional, in_set = [], [], False
    for word in argv:
        if word.startswith("-"):
            in_set = word == "--set"
            out.append(word)
        elif in_set and word in REGISTRY:
            positional.append(word)
        else:
            out.append(word)
    return out + (["--", *positional] if positional else [])


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(untangle(sys.argv[1:] if argv is None else list(argv)))
    try:
        args.func(args)
    except UnpoisonError as e:
        print(f"unpoison: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
