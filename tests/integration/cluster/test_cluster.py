"""cluster/ against the code: the image tag, the job commands, the Serve app, the runtime_env.

Every job command written in cluster/ (the RayJob entrypoint, the `ray job submit` lines
in cluster/README.md and in the YAML headers) is run through the project's config loader
and through the job script's own ``--dry-run``, so a renamed key or flag fails here. The
launcher YAML is checked with Ray's own schema, the runtime_env with Ray's own validation,
merge and packaging, the Serve config with Ray Serve's schema and against
jobs/configs/serve.yaml.
"""
from __future__ import annotations

import copy
import fnmatch
import importlib
import re
import shlex
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path, PurePosixPath

import pytest
import yaml

from hyperscale.storage.local import REPO
from hyperscale.config import ConfigError, load_config, to_yaml

CLUSTER = REPO / "cluster"
DOCKERFILE = CLUSTER / "Dockerfile"
AWS = CLUSTER / "aws.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob-distill.yaml"
RAYSERVICE = CLUSTER / "kuberay" / "rayservice-serve.yaml"
SERVE_YAML = REPO / "jobs" / "configs" / "serve.yaml"
DOCS_WITH_COMMANDS = [CLUSTER / "README.md", AWS, RUNTIME_ENV]

# GPUs per AWS instance type, for the launcher's capacity check (add types as needed).
AWS_GPUS = {"g5.12xlarge": 4, "g5.24xlarge": 4, "g5.48xlarge": 8, "g6.12xlarge": 4, "g6e.12xlarge": 4,
            "p4d.24xlarge": 8, "p4de.24xlarge": 8, "p5.48xlarge": 8}
ENV_KEY = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
# Serve args that may differ between jobs/configs/serve.yaml and the RayService: where the
# model lives and what the replicas run on. Every other arg must be the same.
CLUSTER_SPECIFIC_ARGS = {"generator", "adapters_dir", "num_replicas", "autoscaling", "replica_cpus",
                         "replica_gpus", "torch_threads"}


def load(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), f"{path.relative_to(REPO)}: top level is not a mapping"
    return doc


# ---------------------------------------------------------------- pins and the Dockerfile

def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.lock.txt").read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[name.strip().lower()] = version.strip()
    return pins


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, args = buf.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    return out


def labels() -> dict[str, str]:
    found = {}
    for instr, args in dockerfile():
        if instr == "LABEL":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                found[key] = value
    return found


def image_ref() -> str:
    ref = labels().get("org.opencontainers.image.ref.name")
    assert ref, "cluster/Dockerfile needs LABEL org.opencontainers.image.ref.name=<registry>/hyperscale:<version>"
    return ref


def workdir() -> str:
    dirs = [args for instr, args in dockerfile() if instr == "WORKDIR"]
    assert dirs, "cluster/Dockerfile sets no WORKDIR"
    return dirs[-1]


def copy_sources(instructions=None) -> list[str]:
    sources = []
    for instr, args in instructions if instructions is not None else dockerfile():
        if instr in ("COPY", "ADD"):
            tokens = [t for t in shlex.split(args) if not t.startswith("--")]
            sources += tokens[:-1]
    return sources


def dockerignore() -> list[str]:
    path = DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore")
    lines = path.read_text().splitlines() if path.is_file() else []
    return [ln.strip().rstrip("/") for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def in_image(rel: str) -> bool:
    """Whether repo path ``rel`` lands in the image: under a COPY source, not ignored."""
    rel = PurePosixPath(rel).as_posix().removeprefix("./")
    ignored = any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(rel.split("/")[0], p) for p in dockerignore())
    copied = any(rel == s.rstrip("/") or rel.startswith(s.rstrip("/") + "/") or s in (".", "./")
                 for s in copy_sources())
    return copied and not ignored


# ---------------------------------------------------------------- job commands

def check_job_command(command: str):
    """Validate a job command (``python jobs/<job>.py --config <preset> key=value ...``) with the
    project's config loader and the script's own --dry-run; return the resolved Config."""
    argv = shlex.split(command)
    assert argv[0] in ("python", "python3"), f"{command!r}: runs {argv[0]!r}, not python"
    script = REPO / argv[1]
    assert script.is_file() and script.parent == REPO / "jobs", f"{command!r}: {argv[1]} is not a script in jobs/"
    args = argv[2:]
    assert "--config" in args, f"{command!r}: name the preset with --config"
    preset = REPO / args[args.index("--config") + 1]
    assert preset.is_file(), f"{command!r}: config {preset.relative_to(REPO)} does not exist"
    overrides = [a for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or args[i - 1] != "--config")]
    cfg = load_config(preset, overrides)  # raises ConfigError naming the key
    proc = subprocess.run([sys.executable, str(script), *args, "--dry-run"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{command!r} --dry-run failed:\n{proc.stderr[-3000:]}"
    assert yaml.safe_load(proc.stdout) == yaml.safe_load(to_yaml(cfg)), \
        f"{command!r}: the job's resolved config differs from load_config's"
    return cfg


def submit_commands(path: Path) -> list[tuple[str, str]]:
    """(ray job submit options, entrypoint) for every `ray job submit ... -- ...` in a file,
    in code blocks or in YAML comments, with backslash continuations joined."""
    lines, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        line = line.lstrip("#").strip() if line.startswith("#") else line
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        lines.append(buf + line)
        buf = ""
    found = []
    for line in lines:
        if "ray job submit" in line and " -- " in line:
            submit, _, entrypoint = line[line.index("ray job submit"):].partition(" -- ")
            found.append((submit, entrypoint.strip().rstrip("`")))
    return found


DOC_COMMANDS = [(p, s, e) for p in DOCS_WITH_COMMANDS for s, e in submit_commands(p)]


def gpu_groups(spec: dict) -> list[tuple[dict, int]]:
    """(worker group, GPUs per pod) for KubeRay worker groups that request nvidia.com/gpu."""
    out = []
    for group in spec.get("workerGroupSpecs") or []:
        gpus = 0
        for c in group["template"]["spec"]["containers"]:
            res = c.get("resources", {})
            gpus += int(res.get("limits", {}).get("nvidia.com/gpu", 0))
        if gpus:
            out.append((group, gpus))
    return out


def containers(spec: dict) -> list[dict]:
    out = list(spec["headGroupSpec"]["template"]["spec"]["containers"])
    for group in spec.get("workerGroupSpecs") or []:
        out += group["template"]["spec"]["containers"]
    return out


def cpus(quantity) -> float:
    q = str(quantity)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def rayjob() -> dict:
    return load(RAYJOB)


def rayservice() -> dict:
    return load(RAYSERVICE)


def serve_config() -> dict:
    return yaml.safe_load(rayservice()["spec"]["serveConfigV2"])


# ---------------------------------------------------------------- all files

def test_cluster_has_every_file():
    for path in (DOCKERFILE, AWS, RUNTIME_ENV, RAYJOB, RAYSERVICE, CLUSTER / "README.md"):
        assert path.is_file(), f"missing {path.relative_to(REPO)}"


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_yaml_parses(path):
    doc = load(path)
    for key in ("serveConfigV2", "runtimeEnvYAML"):  # YAML inside YAML
        if key in doc.get("spec", {}):
            assert isinstance(yaml.safe_load(doc["spec"][key]), dict), f"{path.name}: spec.{key} is not a mapping"


# ---------------------------------------------------------------- image

def test_image_tag_is_the_package_version():
    version = pyproject()["project"]["version"]
    repo, _, tag = image_ref().rpartition(":")
    assert repo.rsplit("/", 1)[-1] == "hyperscale", image_ref()
    assert tag == version, f"image tag {tag} != package version {version} (pyproject.toml)"
    assert labels().get("org.opencontainers.image.version") == version


def test_every_manifest_runs_the_dockerfiles_image():
    ref = image_ref()
    docker = load(AWS)["docker"]
    assert docker["image"] == ref, "cluster/aws.yaml docker.image"
    for key in ("head_image", "worker_image"):
        assert docker.get(key, ref) == ref, f"cluster/aws.yaml docker.{key}"
    for node_type, spec in load(AWS)["available_node_types"].items():
        assert spec.get("docker", {}).get("worker_image", ref) == ref, f"cluster/aws.yaml {node_type}"
    for name, spec in (("RayJob", rayjob()["spec"]["rayClusterSpec"]),
                       ("RayService", rayservice()["spec"]["rayClusterConfig"])):
        for c in containers(spec):
            assert c["image"] == ref, f"{name} container {c['name']}: {c['image']} != {ref}"


def test_base_image_and_ray_versions_match_the_pins():
    ray_pin = lock_pins()["ray"]
    assert f"ray[train,tune,serve]=={ray_pin}" in pyproject()["project"]["dependencies"]
    base = [args for instr, args in dockerfile() if instr == "FROM"]
    assert len(base) == 1, "cluster/Dockerfile: one FROM"
    image, _, tag = base[0].split()[-1].partition(":")
    assert image == "rayproject/ray", base[0]
    assert tag.startswith(f"{ray_pin}-py311") and tag.endswith("-gpu"), \
        f"base image {base[0]}: want Ray {ray_pin}, Python 3.11, a GPU build"
    for name, spec in (("RayJob", rayjob()["spec"]["rayClusterSpec"]),
                       ("RayService", rayservice()["spec"]["rayClusterConfig"])):
        assert str(spec["rayVersion"]) == ray_pin, f"{name} rayVersion {spec['rayVersion']} != ray=={ray_pin}"


def test_dockerfile_copies_exist_before_use():
    instructions = dockerfile()
    for src in copy_sources(instructions):
        assert (REPO / src).exists(), f"cluster/Dockerfile copies {src}, which is not in the repo"
        assert in_image(src), f"cluster/Dockerfile copies {src}, but Dockerfile.dockerignore drops it"
    for i, (instr, args) in enumerate(instructions):
        if instr != "RUN":
            continue
        copied = copy_sources(instructions[:i])
        have = lambda rel: any(rel == s.rstrip("/") or rel.startswith(s.rstrip("/") + "/") for s in copied)  # noqa: E731
        pip_steps = [part for part in args.split("&&") if "pip install" in part]
        refs = [r for part in pip_steps for r in re.findall(r"(?:\s-[cr]|--constraint|--requirement)\s+(\S+)", part)]
        for ref in refs:
            assert (REPO / ref).is_file(), f"RUN uses {ref}, which is not in the repo"
            assert have(ref), f"RUN uses {ref} before a COPY brings it in"
        if re.search(r"pip install (-e )?\.(\s|$)", args):
            meta = pyproject()["project"]
            needed = ["pyproject.toml", meta.get("readme", "README.md"), "hyperscale"]
            for rel in needed:
                assert (REPO / rel).exists() and have(rel), f"`pip install .` needs {rel} copied before it"


def test_dockerfile_installs_cuda_torch_then_the_locked_stack():
    runs = [args for instr, args in dockerfile() if instr == "RUN"]
    torch_pin = lock_pins()["torch"]
    assert f"torch=={torch_pin}" in pyproject()["project"]["dependencies"]
    torch_step = [i for i, r in enumerate(runs) if f"torch=={torch_pin}" in r and "--index-url" in r]
    assert torch_step, f"no RUN installs torch=={torch_pin} from a CUDA index (--index-url)"
    index = re.search(r"ARG TORCH_INDEX_URL=(\S+)", DOCKERFILE.read_text())
    assert index and re.search(r"download\.pytorch\.org/whl/cu\d+$", index.group(1)), "TORCH_INDEX_URL: a CUDA index"
    stack_step = [i for i, r in enumerate(runs) if re.search(r"pip install -e \. -c constraints\.lock\.txt", r)]
    assert stack_step, "no RUN does `pip install -e . -c constraints.lock.txt`"
    assert torch_step[0] < stack_step[0], "the CUDA torch must be installed before the locked stack"
    users = [args for instr, args in dockerfile() if instr == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image should run as a non-root user"


def test_image_holds_what_the_rayjob_runs():
    argv = shlex.split(rayjob()["spec"]["entrypoint"])
    cfg = load_config(REPO / argv[argv.index("--config") + 1])
    needed = [argv[1], argv[argv.index("--config") + 1], "pyproject.toml", "hyperscale/config/schema.py"]
    teacher = cfg.model.pretrained_teacher_model
    if teacher and "://" not in teacher and (REPO / teacher).exists():
        needed.append(teacher)
    for rel in needed:
        assert in_image(rel), f"the RayJob needs {rel}, which cluster/Dockerfile does not copy"
    env = yaml.safe_load(rayjob()["spec"]["runtimeEnvYAML"])
    assert env["working_dir"] == f"local://{workdir()}", \
        f"RayJob working_dir {env['working_dir']} is not the image's WORKDIR {workdir()}"


# ---------------------------------------------------------------- AWS launcher

def test_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(load(AWS))))


def test_launcher_schema_check_can_fail():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(load(AWS))
    bad["available_node_types"][bad["head_node_type"]]["node_cfg"] = {}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_launcher_has_a_cpu_head_and_gpu_workers_with_instance_roles():
    cfg = load(AWS)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]["node_config"]["InstanceType"]
    assert head not in AWS_GPUS and not re.match(r"[gp]\d", head), f"head {head} is a GPU type"
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    gpu = {k: v for k, v in workers.items() if v["node_config"]["InstanceType"] in AWS_GPUS
           or v.get("resources", {}).get("GPU")}
    assert gpu, f"no GPU worker type among {[v['node_config']['InstanceType'] for v in workers.values()]}"
    assert all(v["max_workers"] >= max(1, v.get("min_workers", 0)) for v in gpu.values())
    for name, spec in types.items():
        profile = spec["node_config"].get("IamInstanceProfile", {})
        assert profile.get("Arn") or profile.get("Name"), f"{name}: S3 access needs an IamInstanceProfile"
    text = AWS.read_text()
    assert "aws_access_key_id" not in text.lower() and not re.search(r"AKIA[0-9A-Z]{16}", text), "no keys in the file"


def test_launcher_setup_is_minimal_and_start_commands_standard():
    cfg = load(AWS)
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert not any("pip install" in c for c in cfg.get(key) or []), f"{key}: the image has the deps"
    head = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in " ".join(cfg["worker_start_ray_commands"])


def aws_gpu_capacity() -> int:
    cfg = load(AWS)
    total = 0
    for name, spec in cfg["available_node_types"].items():
        if name == cfg["head_node_type"]:
            continue
        gpus = spec.get("resources", {}).get("GPU") or AWS_GPUS.get(spec["node_config"]["InstanceType"], 0)
        total += gpus * min(spec["max_workers"], cfg["max_workers"])
    return total


def test_docs_have_submit_commands():
    assert any(p == CLUSTER / "README.md" for p, _, _ in DOC_COMMANDS), "cluster/README.md shows no ray job submit"


@pytest.mark.parametrize("path,submit,entrypoint", DOC_COMMANDS,
                         ids=[f"{p.name}-{i}" for i, (p, _, _) in enumerate(DOC_COMMANDS)])
def test_documented_submit_commands_run(path, submit, entrypoint):
    opts = shlex.split(submit)
    assert "--runtime-env" in opts, f"{path.name}: {submit!r} does not pass --runtime-env"
    assert (REPO / opts[opts.index("--runtime-env") + 1]) == RUNTIME_ENV, f"{path.name}: runtime env file"
    cfg = check_job_command(entrypoint)
    assert cfg.train.use_gpu, f"{path.name}: a GPU-cluster job without train.use_gpu=true"
    assert cfg.run.output_dir.startswith("s3://"), f"{path.name}: run.output_dir must be shared storage (s3://)"
    assert cfg.train.num_workers <= aws_gpu_capacity(), \
        f"{path.name}: {cfg.train.num_workers} GPU workers > {aws_gpu_capacity()} GPUs in cluster/aws.yaml"


# ---------------------------------------------------------------- runtime_env

def job_envs() -> list[tuple[str, dict]]:
    return [("cluster/runtime_env.yaml", load(RUNTIME_ENV)),
            ("RayJob runtimeEnvYAML", yaml.safe_load(rayjob()["spec"]["runtimeEnvYAML"]))]


@pytest.mark.parametrize("name,env", job_envs(), ids=["runtime_env.yaml", "rayjob"])
def test_runtime_env_is_one_ray_accepts(name, env):
    from ray.runtime_env import RuntimeEnv

    unknown = set(env) - RuntimeEnv.known_fields
    assert not unknown, f"{name}: {sorted(unknown)} are not runtime_env fields ({sorted(RuntimeEnv.known_fields)})"
    RuntimeEnv(**env)  # Ray's own validation (types, paths, URIs)
    assert not {"pip", "uv", "conda"} & set(env), f"{name}: the image has the deps; no pip/uv/conda"
    env_vars = env.get("env_vars", {})
    assert env_vars.get(ENV_KEY) == "0.1", f"{name}: env_vars needs {ENV_KEY}: \"0.1\" (docs/stack.md §3)"
    assert env_vars.get("DS_ACCELERATOR") == "cuda", f"{name}: GPU jobs need DS_ACCELERATOR=cuda"


def test_cluster_envs_set_the_same_env_vars():
    (_, a), (_, b) = job_envs()
    assert a["env_vars"] == b["env_vars"], "cluster/runtime_env.yaml and the RayJob's runtimeEnvYAML differ"


def merge_with_driver(env: dict):
    """What ray.init in a submitted job's driver does with hyperscale's runtime_env."""
    from ray.runtime_env import RuntimeEnv
    from ray.runtime_env.runtime_env import _merge_runtime_env

    from hyperscale.train.launch import RAY_ENV

    driver = {"env_vars": {k: "x" for k in RAY_ENV}}  # ensure_ray passes these keys
    override = env.get("env_vars", {}).get("RAY_OVERRIDE_JOB_RUNTIME_ENV") == "1"
    return _merge_runtime_env(RuntimeEnv(**env), driver, override=override)


@pytest.mark.parametrize("name,env", job_envs(), ids=["runtime_env.yaml", "rayjob"])
def test_runtime_env_merges_with_the_drivers(name, env):
    assert merge_with_driver(env) is not None, (
        f"{name}: Ray would refuse to start the job's driver: hyperscale's ensure_ray passes "
        "runtime_env env_vars with the same keys (set RAY_OVERRIDE_JOB_RUNTIME_ENV: \"1\")")


def test_merge_check_can_fail():
    env = load(RUNTIME_ENV)
    env["env_vars"] = {k: v for k, v in env["env_vars"].items() if k != "RAY_OVERRIDE_JOB_RUNTIME_ENV"}
    assert merge_with_driver(env) is None


def test_working_dir_package_has_the_code_and_not_the_bulk(tmp_path):
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import PACKAGE_SIZE_WARNING, create_package

    env = load(RUNTIME_ENV)
    assert env["working_dir"] == ".", "submit from the repository root with working_dir: ."
    pkg = tmp_path / "pkg.zip"
    create_package(str(REPO), pkg, include_gitignore=True,
                   excludes=ray_constants.get_runtime_env_default_excludes() + list(env.get("excludes", [])))
    names = set(zipfile.ZipFile(pkg).namelist())
    for rel in ("jobs/distill.py", "jobs/configs/sim.yaml", "hyperscale/config/schema.py", "pyproject.toml",
                "assets/teacher/model.safetensors"):
        assert rel in names, f"the working_dir package lacks {rel}"
    for top in (".venv/", "runs/", "logs/", "docs/", ".git/"):
        assert not any(n.startswith(top) for n in names), f"the working_dir package ships {top}"
    assert pkg.stat().st_size < PACKAGE_SIZE_WARNING, f"working_dir package is {pkg.stat().st_size} bytes"


# ---------------------------------------------------------------- RayJob

def test_rayjob_shape():
    doc = rayjob()
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"], "head group has no container"
    assert gpu_groups(cluster), "RayJob: no worker group requests nvidia.com/gpu"


def test_rayjob_entrypoint_runs_and_fits_the_cluster():
    spec = rayjob()["spec"]
    cfg = check_job_command(spec["entrypoint"])
    assert cfg.train.use_gpu, "RayJob: GPU workers but train.use_gpu is false"
    assert cfg.run.output_dir.startswith("s3://"), "RayJob: run.output_dir must be shared storage (s3://)"
    groups = gpu_groups(spec["rayClusterSpec"])
    capacity = sum(g.get("maxReplicas", g.get("replicas", 1)) * gpus for g, gpus in groups)
    assert cfg.train.num_workers <= capacity, f"{cfg.train.num_workers} GPU workers > {capacity} GPUs"
    for group, gpus in groups:
        pod_cpus = sum(cpus(c["resources"]["limits"]["cpu"]) for c in group["template"]["spec"]["containers"])
        assert gpus * cfg.train.cpus_per_worker <= pod_cpus, \
            f"group {group['groupName']}: {gpus} workers x {cfg.train.cpus_per_worker} CPUs > {pod_cpus} CPUs"


def test_entrypoint_check_can_fail():
    entry = rayjob()["spec"]["entrypoint"].replace("train.use_gpu=", "train.use_gpus=")
    with pytest.raises(ConfigError, match="use_gpus"):
        check_job_command(entry)


# ---------------------------------------------------------------- RayService

def serve_apps(config: dict) -> dict[str, dict]:
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)  # Ray Serve's own schema
    return {app.name: app.model_dump() for app in schema.applications}


def test_rayservice_shape():
    doc = rayservice()
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    assert gpu_groups(doc["spec"]["rayClusterConfig"]), "RayService: no worker group requests nvidia.com/gpu"
    apps = serve_apps(serve_config())
    assert list(apps) == ["hyperscale"], f"serveConfigV2 applications: {list(apps)}"
    app = apps["hyperscale"]
    assert app["import_path"] == "hyperscale.serve.app:build_app"
    assert app["route_prefix"] == "/"


def test_rayservice_args_are_valid_serve_settings():
    from hyperscale.serve.settings import parse_settings  # the app's own validation

    app = serve_apps(serve_config())["hyperscale"]
    settings = parse_settings(app["args"])
    spec = rayservice()["spec"]["rayClusterConfig"]
    capacity = sum(g.get("maxReplicas", g.get("replicas", 1)) * gpus for g, gpus in gpu_groups(spec))
    replicas = settings.num_replicas or settings.autoscaling.max_replicas
    assert replicas * settings.replica_gpus <= capacity, \
        f"{replicas} replicas x {settings.replica_gpus} GPUs > {capacity} GPUs in the worker groups"
    assert settings.replica_gpus > 0, "the RayService has GPU workers; give the generator replicas a GPU"
    if settings.auth_token_env:
        for c in containers(spec):
            names = [e["name"] for e in c.get("env", [])]
            assert settings.auth_token_env in names, f"container {c['name']} lacks env {settings.auth_token_env}"
    if settings.throughput_env:  # the proxy reads Serve's throughput settings from the head's env
        from hyperscale.serve.settings import SERVE_THROUGHPUT_ENV

        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in head.get("env", [])}
        assert {k: env.get(k) for k in SERVE_THROUGHPUT_ENV} == SERVE_THROUGHPUT_ENV, "head env vs SERVE_THROUGHPUT_ENV"


def test_rayservice_listens_on_all_interfaces():
    from ray.serve.schema import ServeDeploySchema

    host = ServeDeploySchema.model_validate(serve_config()).http_options.host
    assert host == "0.0.0.0", f"serveConfigV2 http_options.host {host}: the Kubernetes service cannot reach it"


def test_rayservice_serves_what_the_rayjob_exports():
    argv = shlex.split(rayjob()["spec"]["entrypoint"])
    cfg = load_config(REPO / argv[argv.index("--config") + 1], [a for a in argv[2:] if "=" in a])
    generator = serve_apps(serve_config())["hyperscale"]["args"]["generator"]
    assert generator == f"{cfg.run.output_dir}/export/ema", \
        f"RayService generator {generator} is not the RayJob's export {cfg.run.output_dir}/export/ema"


def test_rayservice_carries_the_app_of_jobs_configs_serve_yaml():
    assert SERVE_YAML.is_file(), (
        "jobs/configs/serve.yaml is missing: the RayService's serveConfigV2 must carry the same "
        "application as the project's `serve run`/`serve deploy` config")
    local = serve_apps(load(SERVE_YAML))
    assert "hyperscale" in local, f"jobs/configs/serve.yaml has no application 'hyperscale' ({list(local)})"
    mine, theirs = serve_apps(serve_config())["hyperscale"], local["hyperscale"]
    for key in sorted((set(mine) | set(theirs)) - {"args", "runtime_env"}):
        assert mine.get(key) == theirs.get(key), f"application field {key}: {mine.get(key)!r} != {theirs.get(key)!r}"
    assert set(mine["args"]) == set(theirs["args"]), f"args: {sorted(mine['args'])} != {sorted(theirs['args'])}"
    for key, value in theirs["args"].items():
        if key not in CLUSTER_SPECIFIC_ARGS:
            assert mine["args"][key] == value, f"args.{key}: {mine['args'][key]!r} != {value!r} (serve.yaml)"
    wanted = (theirs.get("runtime_env") or {}).get("env_vars", {})
    have = (mine.get("runtime_env") or {}).get("env_vars", {})
    assert {k: have.get(k) for k in wanted} == wanted, f"runtime_env.env_vars of serve.yaml missing: {wanted}"


def test_serve_import_path_resolves_to_a_callable():
    import_path = serve_apps(serve_config())["hyperscale"]["import_path"]
    module_name, sep, attr = import_path.partition(":")
    if not sep:
        module_name, _, attr = import_path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        pytest.fail(f"import_path {import_path}: module {module_name} does not exist ({e})")
    target = getattr(module, attr, None)
    assert callable(target), f"import_path {import_path}: {attr} is missing or not callable"
