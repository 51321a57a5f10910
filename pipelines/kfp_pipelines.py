"""The defenses as KFP pipelines, built from their declarations; their compilation, and their local execution under
kfp.local.

A defense's pipeline parameters are the CLI's shared configuration (`data`, `protocol`, `train_limit`, `model`,
`seed`, and as dicts `attack`, `train`, `final`) and its own section (`meca`, `aabl`), never another defense's. Every
stage is a task named after it; each task binds only the parameters its stage reads. Every training and scoring
task asks for a GPU node (`on_gpu`), with CPU and memory limits and a timeout; every task reads the S3 and MLflow
credentials from Kubernetes Secrets as environment variables.

The poison task's node: an attack that trains a model while it poisons (lc, narcissus, adaptive_pgd, input_aware:
`components.attacks.trains_model`) gets a GPU, the others none (the attacks still train on the CPU: for now the node
gives them a GPU task's CPUs, memory and timeout). The attack is a pipeline argument, so the compiled pipeline
cannot tell which: the poison task's GPU count is the pipeline parameter `poison_gpus`, "1" or "0", which
`arguments` derives from the attack when the run is submitted; the KFP driver (2.14 and later) resolves it when the
task starts. A string: the driver reads a resource placeholder's value as a string, and gives no limit for a number
(backend/src/v2/driver/resolve.go, resolvePodSpecInputRuntimeParameter). Not dsl.If / dsl.Else over two poison
tasks: the stages would read their outputs through dsl.OneOf, which kfp.local 2.17 does not resolve for artifacts
(kfp/local/orchestrator/orchestrator_utils.py, get_dag_output_artifacts: "Expected 1 artifact in
ArtifactSelectorSpec"), and the tests run the pipelines there. Whatever its GPU count, the poison task has a GPU
task's other settings (requests, limits, timeout, the GPU toleration) but no node selector, which would pin the
poison of an attack that trains nothing to GPU nodes as well.

Retries: every stage task is retried (`RETRIES`, with backoff) when it fails: an evicted pod, a preempted node, a
timeout (what Argo counts as a failure: README, Kubernetes section). A user error (UnpoisonError: bad
configuration or data) does not fail its task, since KFP would retry it too: KFP 2.17's retry policy has no
exit-code filter. The task records the error, the tasks after it pass it on without running, and `track` (never
retried) fails the run with the message and exit code 3 (components/runner.py, `guarded`).

Cache keys: KFP keys a task on its container (image, command, arguments) and its inputs. So that they see what
changed, a submitted pipeline runs its stage image by digest (`stage_image`; `build(image=...)` sets it on every
task, the compiled templates keep `STAGE_IMAGE`), and every pipeline takes `data_hash`, the fingerprint of what
`data` holds (`arguments`, from `components.data.source_fingerprint`), bound to the data-reading task; every other
task reads that task's output artifacts, so changed data under the same path reruns the whole pipeline.

MLflow, live: the pipeline body runs inside `dsl.ExitHandler`. Its first task, `track-start`, opens the run's MLflow
parent run; every stage waits for it and logs its own child run while it runs; `track`, the last task, finishes the
parent run (it reads every stage's output); the exit task, `track-exit`, runs once all others ended, failed or not,
and marks the parent run FAILED unless the pipeline succeeded. The bookkeeping tasks are never cached nor retried.
The tasks find the parent run by the KFP run id, which reaches them as the environment variable KFP_RUN_ID from
their pod's label (`with_secrets`), not as a parameter, which would change every task's cache key in every run
(components/runner.py). KFP takes no pipeline output from inside an exit handler, so a pipeline names its result's
task and output in `pipeline.result`, which `run_local` reads.
"""


import builtins
import copy
import dataclasses
import inspect
import json
import logging
import os
import re
import uuid
from pathlib import Path

from kfp import compiler, dsl, kubernetes
from kfp.dsl import Dataset, Model

from components import kfp_components as c
from components.config import RunConfig
from components.errors import UnpoisonError
from components.defenses import REGISTRY, get
from components.defenses.base import DATA, Defense

COMPILED = Path(__file__).resolve().parent / "compiled"
S3_SECRET = "unpoison-s3"  # keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, S3_ENDPOINT
MLFLOW_SECRET = "unpoison-mlflow"  # keys MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD
GPU_NODE_SELECTOR = os.environ.get("UNPOISON_GPU_NODE_SELECTOR", "")  # "label=value", read at compile time
# Limits of a GPU task, read at compile time too: twice its requests (4 CPUs, 16Gi), room for data loading and
# torch.compile workers; beyond the memory limit the pod is OOM-killed (and retried), above the CPU limit throttled.
GPU_CPU_LIMIT = os.environ.get("UNPOISON_GPU_CPU_LIMIT", "8")
GPU_MEMORY_LIMIT = os.environ.get("UNPOISON_GPU_MEMORY_LIMIT", "32Gi")
# Seconds one attempt of a GPU task may run (the pod's activeDeadlineSeconds): a hung attempt gives its GPU back.
# 6 h: a paper-protocol stage (at most 100 epochs of ResNet-18 on CIFAR-10) should take a fraction of it on one GPU
# (no GPU timing is recorded yet); raise it for a slow GPU or a longer schedule.
GPU_TIMEOUT_S = int(os.environ.get("UNPOISON_GPU_TIMEOUT", str(6 * 3600)))
RETRIES = 2  # retries of a failed task, 30 s then 60 s apart


def without_none(tree):
    """Pipeline parameter defaults cannot hold None: leave such keys out (the typed params default them to None)."""
    if isinstance(tree, dict):
        return {k: without_none(v) for k, v in tree.items() if v is not None}
    return tree


DATA_HASH = "data_hash"  # the pipeline parameter holding the data's fingerprint, bound to the data-reading task
POISON_GPUS = "poison_gpus"  # the pipeline parameter holding the poison task's GPU count, "1" or "0" (`poison_gpus`)
DEFAULTS = {**without_none(RunConfig().model_dump()), "train_limit": 10000,  # the CPU protocol's, as in cpu.yaml
            DATA_HASH: "", POISON_GPUS: "0"}
DIGEST = re.compile(r"^[^\s@]+@sha256:[0-9a-f]{64}$")  # REPO@sha256:<64 hex>


def stage_image(image: str | None, allow_tag: bool = False) -> str:
    """The stage image a submitted pipeline runs: `image` (default `STAGE_IMAGE`), which must name a digest, since
    KFP's cache key sees the image reference, not its content: under a tag, a rebuilt image is served the results
    of the old one. A tag is taken only with `allow_tag`. No registry is asked (resolving a tag needs one)."""
    image = image or c.STAGE_IMAGE
    if not DIGEST.match(image) and not allow_tag:
        repo = image.split("@")[0].rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image.split("@")[0]
        raise UnpoisonError(
            f"stage image '{image}' is not pinned by digest: KFP's cache key sees the tag, not the image, so after a "
            f"rebuild under the same tag the cached results of the old image are served; pass --image "
            f"{repo}@sha256:<digest> (`docker buildx imagetools inspect {image}` or `crane digest {image}` prints "
            f"it), or --allow-tag to submit the tag as it is")
    return image


RUN_ID_ENV = "KFP_RUN_ID"  # every task's KFP run id, from its pod's label (components/runner.py, kfp_run_id)


def with_secrets(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """The object store and MLflow credentials as env vars from Secrets (never component inputs), and the KFP run id
    from the pod's label `pipeline/runid`: the stage tasks find the run's MLflow parent run by it. Both come in
    through the pod spec, outside the task's cache key."""
    kubernetes.use_field_path_as_env(task, env_name=RUN_ID_ENV, field_path="metadata.labels['pipeline/runid']")
    keys = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_ENDPOINT"]
    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env={k: k for k in keys})
    # optional, key by key: without the Secret no tracking; without the user keys, a server without authentication
    mlflow_keys = ["MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"]
    kubernetes.use_secret_as_env(task, secret_name=MLFLOW_SECRET, optional=True,
                                 secret_key_to_env={k: k for k in mlflow_keys})
    return task


def on_gpu(task: dsl.PipelineTask, *, gpus=1, node_selector: bool = True, cpu: str = "4", memory: str = "16Gi",
           cpu_limit: str = GPU_CPU_LIMIT, memory_limit: str = GPU_MEMORY_LIMIT,
           timeout_s: int = GPU_TIMEOUT_S) -> dsl.PipelineTask:
    """A training or scoring task: `gpus` NVIDIA GPUs (one, or a pipeline parameter holding the count), their
    toleration, the optional node selector (unless `node_selector` is False), CPU and memory requests and limits, a
    timeout per attempt, retries with backoff, secrets as env, caching on."""
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)
    kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
    if GPU_NODE_SELECTOR and node_selector:
        key, _, value = GPU_NODE_SELECTOR.partition("=")
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    task.set_cpu_limit(cpu_limit).set_memory_limit(memory_limit)
    kubernetes.set_timeout(task, timeout_s)  # a timed-out attempt fails, and is retried like an evicted one
    on_cpu(task, cpu=cpu, memory=memory)
    # Argo retries only within backoff_max_duration of the first attempt's start, and cuts a retry at that
    # deadline. KFP's default of 1 h would leave a GPU stage preempted after its first hour without a retry: give
    # every attempt its full timeout, with an hour to spare for scheduling and the backoff.
    return task.set_retry(num_retries=RETRIES, backoff_duration="30s", backoff_factor=2,
                          backoff_max_duration=f"{(RETRIES + 1) * timeout_s + 3600}s")


def on_poison_node(task: dsl.PipelineTask, gpus) -> dsl.PipelineTask:
    """The poison task: a GPU task whose GPU count is the pipeline parameter `gpus` (POISON_GPUS), without the node
    selector (module docstring). The parameter is registered as the task's input: kfp 2.17's compiler passes a
    channel that only a resource setting reads into none of the groups around the task (the exit handler, a loop),
    and the task would find no such input when it runs."""
    task.register_pipeline_channels([gpus])
    return on_gpu(task, gpus=gpus, node_selector=False)


def poison_gpus(*attacks: str) -> str:
    """The poison task's GPU count for `attacks` (POISON_GPUS): "1" if one of them trains a model, else "0"."""
    from components.attacks import trains_model

    return "1" if any(trains_model(a) for a in attacks) else "0"


def on_cpu(task: dsl.PipelineTask, *, cpu: str = "2", memory: str = "8Gi") -> dsl.PipelineTask:
    task.set_cpu_request(cpu).set_memory_request(memory)
    # Every failure is retried: KFP cannot tell a user error by exit code, so a stage never fails on one (module
    # docstring). CPU stages are short: KFP's default backoff_max_duration (1 h) covers their retries.
    task.set_retry(num_retries=RETRIES, backoff_duration="30s", backoff_factor=2)
    task.set_caching_options(enable_caching=True)
    return with_secrets(task)


CONFIG_KEYS = ("data", "protocol", "train_limit", "model", "seed", "attack", "train", "final")  # every pipeline's


def _named(comp, name: str, description: str):
    """A copy of a generic component whose tasks carry the stage's name (KFP names a task after its component)."""
    named = copy.copy(comp)
    named.component_spec = dataclasses.replace(comp.component_spec, name=name.replace("_", "-"),
                                               description=description)
    named.name = named.component_spec.name
    return named


def parameters(d: Defense, delivered: bool = False) -> list[str]:
    """A defense's pipeline parameters: the shared configuration keys and its own section, never another's, the
    data's fingerprint and, when an attack is injected, the poison task's GPU count."""
    return [*CONFIG_KEYS, *([d.section] if d.section else []), DATA_HASH, *([] if delivered else [POISON_GPUS])]


def _config_args(d: Defense, p: dict, keys) -> dict:
    """The task arguments for configuration keys `keys` (the defense's section goes to `section`)."""
    return {("section" if k == d.section else k): p[k] for k in dict.fromkeys(keys)}


def _slots(outputs: dict, names) -> dict:
    names = list(names)
    if len(names) > c.SLOTS:
        raise ValueError(f"a stage reads {len(names)} outputs; the generic components take {c.SLOTS}")
    return {"upstream": names, **{f"in{i}": outputs[n] for i, n in enumerate(names)}}


def stage_task(d: Defense, st, p: dict, outputs: dict, delivered: bool, name: str | None = None) -> dsl.PipelineTask:
    """The task of a declared stage after the data stage, its GPU or CPU settings applied: it binds the configuration
    keys the stage reads (from the parameters `p`) and the upstream outputs it reads (`outputs`: stage name, `truth`
    -> task output). `name` names the task (default: the stage's name); the matrix pipeline (pipelines/matrix.py)
    prefixes the defense."""
    keys = (*st.reads, *(["data"] if st.monitor else []))
    upstream = [d.plan(delivered)[0].name if u == DATA else u for u in st.upstream]
    if st.name == "evaluate":
        upstream.insert(1, "truth")
        comp = c.evaluate if name is None else _named(c.evaluate, name, c.evaluate.component_spec.description)
        return on_gpu(comp(defense=d.name, delivered=delivered, **_config_args(d, p, keys),
                           **_slots(outputs, upstream)))
    comp = c.stage_model if st.kind == "model" else c.stage_dataset
    task = _named(comp, name or st.name, (st.fn.__doc__ or st.name).split(".")[0])(
        defense=d.name, stage=st.name, delivered=delivered, **_config_args(d, p, keys), **_slots(outputs, upstream))
    return (on_gpu if st.gpu else on_cpu)(task)


def build(defense: str, *, delivered: bool = False, execute: list[str] | None = None,
          imported: dict[str, str] | None = None, image: str | None = None):
    """The defense's KFP pipeline, built from its declaration. For a rerun, `execute` names the stages that run and
    `imported` maps every other stage the run needs (and `truth`) to the artifact URI an earlier run recorded; they
    come in through dsl.importer, so nothing upstream executes. The pipeline's result (`pipeline.result`, the task and
    output name) is the evaluation metrics, or for a rerun the output of the last stage it executes. `image` replaces
    the components' `STAGE_IMAGE` on every task (`stage_image` checks it)."""
    d = get(defense)
    plan = d.plan(delivered)
    data_name = plan[0].name
    names = parameters(d, delivered)
    config_names = [n for n in names if n not in (DATA_HASH, POISON_GPUS)]
    run_all = execute is None
    execute = [s.name for s in plan] if run_all else execute
    kinds = {st.name: (Dataset if st.kind == "dataset" else Model) for st in plan}
    kinds.update({data_name: Dataset, "truth": Dataset})

    def bookkeeping(task: dsl.PipelineTask) -> dsl.PipelineTask:
        """A tracking task: runs every time, never retried (`track` fails a run on a user error, once)."""
        with_secrets(task).set_caching_options(enable_caching=False)
        return task.set_cpu_request("1").set_memory_request("2Gi")

    def body(*args):
        p = dict(zip(names, args))
        # the exit handler's task runs once every task inside has ended, failed or not: it fails the MLflow run
        # unless all of them succeeded
        exit_task = bookkeeping(c.track_exit(run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER))
        with dsl.ExitHandler(exit_task, name="tracked"):
            tasks = [exit_task, *tracked_stages(p)]
        if image:
            for task in tasks:
                task.set_container_image(image)

    def tracked_stages(p: dict) -> list[dsl.PipelineTask]:
        """The tasks inside the exit handler: `track-start`, the stages, `track`."""
        outputs = {}
        start = bookkeeping(c.track_start(run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, defense=defense,
                                          **_config_args(d, p, config_names)))
        tasks = [start]
        for name, uri in (imported or {}).items():
            if name not in execute:
                outputs[name] = dsl.importer(artifact_uri=uri, artifact_class=kinds.get(name, Dataset),
                                             reimport=False).output
        for st in plan:
            if st.name not in execute:
                continue
            if st is plan[0]:
                task = _named(c.ingest if delivered else c.poison, st.name, st.fn.__doc__.split(".")[0])(
                    data=p["data"], attack=p["attack"], train_limit=p["train_limit"], data_hash=p[DATA_HASH])
                task = on_cpu(task) if delivered else on_poison_node(task, p[POISON_GPUS])
                tasks.append(task)
                outputs[st.name], outputs["truth"] = task.outputs["dataset"], task.outputs["truth"]
                continue
            task = stage_task(d, st, p, outputs, delivered)
            tasks.append(task)
            outputs[st.name] = task.outputs["metrics" if st.name == "evaluate" else "out"]
        for task in tasks[1:]:  # every stage waits for its MLflow parent run (an ordering, not a cache-key input)
            task.after(start)
        recorded = [s.name for s in plan if s.name in outputs] + ["truth"]
        tasks.append(bookkeeping(c.track(run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, defense=defense, delivered=delivered,
                                         **_config_args(d, p, config_names), **_slots(outputs, recorded))))
        return tasks

    body.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=DEFAULTS[n],
                           annotation=type(DEFAULTS[n])) for n in names])
    body.__name__ = f"{defense.replace('-', '_')}_pipeline"
    suffix = ("-delivered" if delivered else "") + ("" if run_all else f"-rerun-{execute[0]}".replace("_", "-"))
    pipeline = dsl.pipeline(name=f"unpoison-{defense}{suffix}", description=d.description)(body)
    # KFP takes no pipeline output from inside an exit handler: `run_local` finds the result, the evaluation
    # metrics or the output of the last stage a rerun executes, by its task and output name
    last_stage = [s for s in plan if s.name in execute][-1]
    pipeline.result = (last_stage.name.replace("_", "-"), "metrics" if last_stage.name == "evaluate" else
                       "dataset" if last_stage is plan[0] else "out")
    return pipeline


def compiled_tasks(spec: dict) -> dict:
    """The tasks of a compiled pipeline spec by name, those inside the exit handler's group included (not the group)."""
    dags = [spec["root"]["dag"], *(comp["dag"] for comp in spec["components"].values() if "dag" in comp)]
    return {name: task for dag in dags for name, task in dag["tasks"].items()
            if "dag" not in spec["components"][task["componentRef"]["name"]]}


def pipeline_name(defense: str, delivered: bool) -> str:
    """The compiled file's stem: `<defense>` (an attack is injected) or `<defense>-delivered` (--attack none)."""
    return f"{defense}-delivered" if delivered else defense


def arguments(cfg: RunConfig, defense: str, data_hash: str | None = None) -> dict:
    """Pipeline arguments from a validated configuration (the seed goes into the training params, as locally).
    `data_hash` defaults to the fingerprint of `cfg.data`, read here (`components.data.source_fingerprint`); the
    poison task's GPU count follows the attack (`poison_gpus`)."""
    from components.data import source_fingerprint

    d = get(defense)
    tree = {"data": cfg.data, "protocol": cfg.protocol, "train_limit": cfg.train_limit or 0, "model": cfg.model,
            "seed": cfg.seed, "attack": cfg.attack.model_dump(),
            "train": cfg.train.model_copy(update={"seed": cfg.seed}).model_dump(), "final": cfg.final}
    if d.section:
        tree[d.section] = getattr(cfg, d.section).model_dump()
    tree[DATA_HASH] = source_fingerprint(cfg.data) if data_hash is None else data_hash
    if cfg.attack.name != "none":  # the pipeline of a data set as delivered has no poison task
        tree[POISON_GPUS] = poison_gpus(cfg.attack.name)
    return without_none(tree)


def compile_all(folder: Path = COMPILED) -> list[Path]:
    """Every defense's pipeline, for an injected attack and for a data set as delivered."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in REGISTRY:
        for delivered in (False, True):
            path = folder / f"{pipeline_name(name, delivered)}.yaml"
            compiler.Compiler().compile(build(name, delivered=delivered), str(path))
            out.append(path)
    return out


class TaskLog(logging.Handler):
    """Collects the tasks kfp.local served from its cache (from its log) and, after the run, those it executed (the
    task folders of the new pipeline run folder: an executed task writes there, a cached one does not)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.executed, self.cached = [], []
        self.cache_keys = {}  # cached task -> the start of its cache key, as kfp.local logs it

    def emit(self, record):
        msg = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())  # kfp.local colours task names
        if m := re.search(r"Task '?([\w-]+)'? cache hit(?: \(key=(\w+)\))?", msg):
            self.cached.append(m.group(1))
            self.cache_keys[m.group(1)] = m.group(2)


def run_local(pipeline, arguments: dict, root: Path, *, mlflow_uri: str | None = None,
              cache: bool = True) -> tuple[Path, TaskLog]:
    """Run a pipeline of `build` under kfp.local.SubprocessRunner(use_venv=False) with caching on (cache in
    root/.kfp_cache), or off with `cache=False` (every task executes; the cache is left as it is). The tasks get
    KFP_RUN_ID, a fresh id, as a pod gets it from its label, and `mlflow_uri` as MLFLOW_TRACKING_URI.
    Returns the folder of the pipeline's result (`pipeline.result`) and the task log."""
    from kfp import local

    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    before = set(root.iterdir())
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), enable_caching=cache,
               cache_root=str(root / ".kfp_cache"))
    log = TaskLog()
    logger = logging.getLogger()
    old_level, old_handlers = logger.level, logger.handlers[:]
    logger.addHandler(log)
    logger.setLevel(logging.INFO)
    # the tasks inherit this process's environment: the tracking URI, and the run id a pod reads from its label
    env = {RUN_ID_ENV: uuid.uuid4().hex, **({"MLFLOW_TRACKING_URI": mlflow_uri} if mlflow_uri else {})}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # kfp.local indents a task's prints by swapping builtins.print for the task's span (logging_utils.indented_print);
    # two loop iterations in parallel (the matrix's ParallelFor) can restore each other's swap and leave every later
    # print of this process indented: put the original back. Its logging context (logging_utils.local_logger_context)
    # swaps the root logger's handlers the same way, and the race can leave a task's StreamHandler on a stdout that a
    # caller (pytest's capture) has closed since: every later log record then fails. Put the handlers back too.
    original_print = builtins.print
    try:
        task = pipeline(**arguments)
    finally:
        builtins.print = original_print
        logger.handlers[:] = old_handlers
        logger.setLevel(old_level)
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.update({k: v})
    # kfp.local names a run's folder <pipeline name>-<timestamp>; other new folders (an MLflow store's mlartifacts
    # beside a sqlite database in root) are not runs
    new = [d for d in root.iterdir() if d not in before and d.is_dir() and d.name.startswith(f"{pipeline.name}-")]
    log.executed = sorted(t.name for d in new for t in d.iterdir() if t.is_dir())
    task_name, output = pipeline.result
    if log.cache_keys.get(task_name):  # served from the cache: the output its cache entry names, from an earlier run
        entry = next((root / ".kfp_cache").glob(f"{log.cache_keys[task_name]}*.json"))
        return Path(json.loads(entry.read_text())[output]["uri"]), log
    return new[0] / task_name / output, log
