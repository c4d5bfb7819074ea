"""docker/ without a Docker engine.

Both Dockerfiles are linted (hadolint) and their pins checked against pyproject.toml;
docker/compose.yaml and its GPU overlay are validated against the Compose spec. Then the
commands the images and the compose cluster run are run here as plain processes: the
package is built from exactly the files the Dockerfiles copy, the image's CMD runs, and the
compose topology (head, two workers, the job, TensorBoard) runs with compose's own commands
in a network namespace of its own, where the service names resolve to loopback as they
resolve to containers under compose. Each node gets what a container would give it for
free: its own Ray temp dir and ports.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "gpu": DOCKER / "Dockerfile.gpu"}
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_GPU = DOCKER / "compose.gpu.yaml"
WORKERS = ("worker-1", "worker-2")
# the tiny run the job's command gets on top of its own overrides (later overrides win)
JOB_OVERRIDES = ["train.epochs=1", "train.max_steps=5", "split.stages=2", "cluster.cpus_per_worker=0.5",
                 "train.progress=false"]
# whichever of the cluster's tests runs first starts it and runs the job (about 80 s here)
CLUSTER_TIMEOUT = pytest.mark.timeout(900)
MARKER = "DECOUPLED_TEST_DOCKER"  # in every process this file starts, to find any left behind


def tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed next to {sys.executable} or on PATH (pip install -e '.[test]')")
    return found


# ------------------------------------------------------------------ reading the files


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) as Docker reads them: continued lines joined, comment lines dropped."""
    out, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#"):  # Docker drops these inside a continued instruction too
            continue
        if text.endswith("\\"):
            pending += text[:-1].strip() + " "
            continue
        keyword, _, args = (pending + text).partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    return out


def build_args(dockerfile: Path) -> dict[str, str]:
    return dict(args.split("=", 1) for kw, args in instructions(dockerfile) if kw == "ARG" and "=" in args)


def expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m[1] or m[2], m[0]), text)


def run_commands(dockerfile: Path) -> list[str]:
    """Each RUN line, ARG defaults filled in, as plain words (shell quoting removed)."""
    values = build_args(dockerfile)
    return [" ".join(shlex.split(expand(args, values))) for kw, args in instructions(dockerfile) if kw == "RUN"]


def pins(dockerfile: Path) -> dict[str, tuple[str, str]]:
    """name -> (extras, version) for every name==version that a RUN line installs."""
    found = {}
    for command in run_commands(dockerfile):
        for word in command.split():
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==(\S+)", word)
            if m:
                found[m[1].lower()] = (m[2] or "", m[3])
    return found


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$, reading ``env`` as compose reads the shell's."""
    def one(m: re.Match) -> str:
        if m[0] == "$$":
            return "$"
        name, op, arg = m["name"], m["op"], m["arg"]
        if env.get(name):
            return env[name]
        if op and op.endswith("?"):
            raise KeyError(f"compose needs {name}: {arg}")
        return arg if op else ""
    return re.sub(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}", one, value)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` (relative to the build context) out: the last matching line
    decides, '!' puts back, a matched folder takes its contents along (enough of Docker's rules
    for a .dockerignore of plain names and '**/' prefixes)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for line in patterns:
        keep = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        variants = [pattern, pattern[3:]] if pattern.startswith("**/") else [pattern]
        if any(fnmatch.fnmatchcase(p, v) for p in prefixes for v in variants):
            ignored = not keep
    return ignored


def compose(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())  # safe_load resolves the x-node / worker anchors and merges


# ------------------------------------------------------------------ lint and schema


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint_finds_nothing(kind):
    config = DOCKER / ".hadolint.yaml"
    done = subprocess.run([tool("hadolint"), *(["--config", str(config)] if config.exists() else []),
                           str(DOCKERFILES[kind])], capture_output=True, text=True)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_hadolint_reports_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install foo\n")
    done = subprocess.run([tool("hadolint"), str(bad)], capture_output=True, text=True)
    assert done.returncode != 0
    for rule in ("DL3006", "DL3008"):  # untagged base image; unpinned apt package
        assert rule in done.stdout, done.stdout


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU], ids=lambda p: p.name)
def test_compose_files_match_the_compose_spec(path):
    done = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_compose_schema_check_reports_a_broken_file(tmp_path):
    data = compose()
    assert check_schema_copy(tmp_path, data).returncode == 0  # the same file, written back, still passes
    data["services"]["head"]["comand"] = data["services"]["head"].pop("command")
    done = check_schema_copy(tmp_path, data)
    assert done.returncode != 0 and "comand" in done.stdout, done.stdout + done.stderr


def check_schema_copy(tmp_path: Path, data: dict) -> subprocess.CompletedProcess:
    copy = tmp_path / "compose.yaml"
    copy.write_text(yaml.safe_dump(data))
    return subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(copy)],
                          capture_output=True, text=True)


# ------------------------------------------------------------------ what the files promise


def test_the_images_pin_what_pyproject_requires():
    import tomllib  # Python 3.11+

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    required = {Requirement(r).name.lower(): Requirement(r) for r in project["dependencies"]}
    cpu, gpu = pins(DOCKERFILES["cpu"]), pins(DOCKERFILES["gpu"])
    assert set(cpu) == {"torch", "ray"}, cpu
    # a Ray cluster needs one Python and one Ray on every node: CPU and GPU nodes must match
    assert cpu == gpu
    bases = {kind: [a for kw, a in instructions(f) if kw == "FROM"] for kind, f in DOCKERFILES.items()}
    assert bases["cpu"] == bases["gpu"] and len(bases["cpu"]) == 1, bases
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", bases["cpu"][0]), "pin the base image's Python"
    for name, (extras, version) in cpu.items():
        assert required[name].specifier.contains(version), f"{name}=={version} is outside pyproject's {required[name]}"
    assert cpu["ray"][0] == "[default]"  # the dashboard and job API that compose.yaml's job uses
    ci = re.search(r"torch==(\S+)", (REPO / ".ci" / "run").read_text())
    if ci:  # the images ship the torch that CI tests
        assert cpu["torch"][1] == ci[1]
    indexes = {kind: build_args(f)["TORCH_INDEX_URL"] for kind, f in DOCKERFILES.items()}
    assert indexes["cpu"].endswith("/whl/cpu")
    assert re.search(r"/whl/cu12\d$", indexes["gpu"]), "CUDA 12 wheels: drivers >= 525 run them"


def test_the_images_run_as_the_user_they_create():
    for path in DOCKERFILES.values():
        steps = instructions(path)
        users = [a for kw, a in steps if kw == "USER"]
        assert users == ["1000:1000"], users
        assert any("useradd" in c and "--uid 1000" in c for c in run_commands(path))
        assert ("WORKDIR", "/app") in steps


# Every command the Dockerfiles run, and how this file covers it: a new RUN line fails
# test_every_dockerfile_command_is_covered until someone decides how to check it.
RUN_COVERAGE = {
    r"python -m venv /opt/venv": "not run: the base image's own Python makes it",
    r"pip install --no-cache-dir --index-url \S+ torch==\S+ && pip install --no-cache-dir ray\[default\]==\S+":
        "needs the network: test_the_images_pin_what_pyproject_requires checks the pins",
    r"pip install --no-cache-dir \. && rm -rf build decoupled\.egg-info": "run by the image_app fixture",
    r"useradd --create-home --uid 1000 --user-group app && install -d -o app -g app /app/runs":
        "not run (it would add a user here): test_the_images_run_as_the_user_they_create",
}


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_every_dockerfile_command_is_covered(kind):
    uncovered = [c for c in run_commands(DOCKERFILES[kind]) if not any(re.fullmatch(p, c) for p in RUN_COVERAGE)]
    assert not uncovered, f"RUN lines with no check in this file: {uncovered}"
    entry = [a for kw, a in instructions(DOCKERFILES[kind]) if kw in ("CMD", "ENTRYPOINT")]
    assert [json.loads(a) for a in entry] == [["decoupled", "--help"]]  # test_the_image_cmd_runs runs it


def test_compose_is_a_head_two_workers_a_job_and_tensorboard():
    services = compose()["services"]
    assert set(services) == {"head", *WORKERS, "job", "tensorboard"}
    head = shlex.split(services["head"]["command"])
    assert head[:3] == ["ray", "start", "--head"] and "--port=6379" in head and "--block" in head
    for name in WORKERS:
        worker = services[name]
        assert "--address=head:6379" in shlex.split(worker["command"])
        assert worker["depends_on"]["head"]["condition"] == "service_healthy"
    assert {w: c["condition"] for w, c in services["job"]["depends_on"].items()} == dict.fromkeys(
        WORKERS, "service_healthy")
    for name, service in services.items():
        # every node writes runs/ (the driver's summaries, the workers' checkpoints): one folder, the host's
        assert "../runs:/app/runs" in service["volumes"], name
        assert service["shm_size"] and service["init"] is True, name
        assert service["environment"]["RAY_AUTH_MODE"] == "token", name
    # `up` starts the cluster; the job and TensorBoard are started by name
    assert {name for name, s in services.items() if not s.get("profiles")} == {"head", *WORKERS}
    published = {p for s in services.values() for p in s.get("ports", [])}
    assert published == {"127.0.0.1:8265:8265", "127.0.0.1:6006:6006"}  # this machine only


def test_the_gpu_overlay_gives_each_worker_its_own_gpu():
    overlay = compose(COMPOSE_GPU)["services"]
    env = {}
    devices = []
    for name in WORKERS:
        reservation = overlay[name]["deploy"]["resources"]["reservations"]["devices"]
        assert [d["driver"] for d in reservation] == ["nvidia"] and reservation[0]["capabilities"] == ["gpu"]
        devices += [interpolate(i, env) for i in reservation[0]["device_ids"]]
    assert len(set(devices)) == len(WORKERS), devices
    for name, service in overlay.items():
        assert service["build"]["dockerfile"] == "docker/Dockerfile.gpu", name
        assert service["image"] == "decoupled:gpu", name
    assert set(overlay) == set(compose()["services"])  # no service left on the CPU image


# ------------------------------------------------------------------ the commands, run here


@pytest.fixture(scope="module")
def scratch():
    # short: Ray's unix sockets live under it, and their paths may not exceed 107 bytes
    root = Path(tempfile.mkdtemp(prefix="dkr", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def image_app(scratch):
    """The image's /app (what Dockerfile.cpu copies there) and the package its RUN line installs, built here."""
    app, site = scratch / "app", scratch / "site"
    app.mkdir()
    ignore_file = REPO / ".dockerignore"
    patterns = [line.strip() for line in ignore_file.read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")] if ignore_file.exists() else []
    steps = instructions(DOCKERFILES["cpu"])
    assert ("WORKDIR", "/app") in steps
    for kw, args in steps:
        if kw != "COPY":
            continue
        *sources, dest = shlex.split(args)
        target = app if dest in ("./", ".") else app / dest
        for source in sources:
            assert not dockerignored(source, patterns), f"COPY {source}: .dockerignore leaves it out of the context"
            path = REPO / source
            files = sorted(path.rglob("*")) if path.is_dir() else [path]
            for file in files:
                rel = file.relative_to(REPO).as_posix()
                if file.is_file() and not dockerignored(rel, patterns):
                    to = target / file.relative_to(path) if path.is_dir() else target / file.name
                    to.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(file, to)
    install = next(c for c in run_commands(DOCKERFILES["cpu"]) if c.startswith("pip install --no-cache-dir ."))
    # the same pip line, into a folder of its own: no dependencies (this venv has them), no network
    here = install.replace("pip install --no-cache-dir .", f"{shlex.quote(sys.executable)} -m pip install "
                           f"--no-cache-dir --no-deps --no-build-isolation --no-index --target {site} .")
    done = subprocess.run(here, shell=True, cwd=app, capture_output=True, text=True)
    if "invalid command 'bdist_wheel'" in done.stdout + done.stderr:
        pytest.fail("building the package here needs setuptools >= 70.1 in the test environment")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in app.iterdir()) == ["README.md", "configs", "decoupled", "pyproject.toml"]
    assert (site / "decoupled" / "cli.py").exists() and (site / "bin" / "decoupled").exists()
    return app, site


def test_the_image_cmd_runs(image_app):
    app, site = image_app
    (cmd,) = [json.loads(a) for kw, a in instructions(DOCKERFILES["cpu"]) if kw == "CMD"]
    done = subprocess.run(cmd, cwd=app, capture_output=True, text=True, env=package_env(site))
    assert done.returncode == 0, done.stderr
    for command in ("train", "compare", "dashboard"):
        assert command in done.stdout


def package_env(site: Path) -> dict[str, str]:
    """The image's environment: the package as the Dockerfile installed it, first on the paths."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    env["PATH"] = os.pathsep.join([str(site / "bin"), str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@pytest.fixture(scope="module")
def netns(scratch):
    """A network namespace with loopback only, where compose's service names resolve to 127.0.0.1.

    Ray's nodes there see one address, 127.0.0.1, as each container sees its own; nothing in
    it can reach another address, and its ports cannot clash with anything else on this machine.
    """
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.fail("the compose cluster test needs root and iproute2 (ip netns) for a loopback-only network")
    name = f"decoupled-docker-{os.getpid()}"
    hosts = Path("/etc/netns") / name  # `ip netns exec` mounts the files here over /etc
    made_parent = not hosts.parent.exists()
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode:
        pytest.fail(f"cannot make a network namespace here: {made.stderr.strip()}")
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        hosts.mkdir(parents=True)
        names = " ".join([socket.gethostname(), *compose()["services"]])
        (hosts / "hosts").write_text(f"127.0.0.1 localhost {names}\n::1 localhost\n")
        yield ["ip", "netns", "exec", name]
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)
        shutil.rmtree(hosts, ignore_errors=True)
        if made_parent:
            shutil.rmtree(hosts.parent, ignore_errors=True)


def marked_processes(root: Path) -> dict[int, str]:
    """Live processes that carry this module's marker (Ray's workers rename themselves, but keep their environment)."""
    needle = f"{MARKER}={root}\0".encode()
    found = {}
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes():
                pid = int(environ.parent.name)
                state = (environ.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found[pid] = (environ.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue
    return found


def stop(procs: list[subprocess.Popen], root: Path, grace_s: float = 60) -> dict[int, str]:
    """SIGTERM, as `docker compose down` sends; returns what was still running after the grace time, then kills it."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    while marked_processes(root) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = marked_processes(root)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        if p.poll() is None:
            p.wait(10)
    gone = time.monotonic() + 10
    while marked_processes(root) and time.monotonic() < gone:
        time.sleep(0.2)
    assert not marked_processes(root), f"could not kill {marked_processes(root)}"
    return {pid: command[:200] for pid, command in left.items()}


AGENT_PORT = "52365"  # Ray's default for a node's agent, which compose's healthchecks ask


def node_ports(index: int) -> dict[str, int]:
    """What a container gives each node for free, given by hand to nodes that share one network."""
    base = 20000 + 100 * index
    names = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")
    return {**{n: base + i for i, n in enumerate(names)}, "min-worker-port": base + 10, "max-worker-port": base + 99}


def node_flags(index: int, root: Path) -> list[str]:
    return [f"--temp-dir={root}/node{index}", *(f"--{k}={v}" for k, v in node_ports(index).items())]


def wait_for(check, what: str, timeout_s: float, logs: list[Path]):
    deadline = time.monotonic() + timeout_s
    while True:
        done = check()
        if done.returncode == 0:
            return done
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in logs if p.exists())
            pytest.fail(f"{what}: not within {timeout_s:.0f} s\n{done.stdout[-2000:]}{done.stderr[-2000:]}\n{tails}")
        time.sleep(1)


@pytest.fixture(scope="module")
def cluster_job(netns, image_app, scratch):
    """compose up + compose run job, as processes: returns the job, the runs folder and what was left running."""
    app, site = image_app
    services = compose()["services"]
    shell_env = {"RAY_AUTH_TOKEN": os.urandom(16).hex()}
    env = {k: v for k, v in package_env(site).items() if not k.startswith("RAY_")}  # this machine's Ray settings
    env.update({k: interpolate(str(v), shell_env) for k, v in services["head"]["environment"].items()})
    env.update({"HOME": str(scratch / "home"), MARKER: str(scratch)})  # compose's HOME=/tmp is shared here
    (scratch / "home").mkdir()

    def command(service: str) -> list[str]:
        return shlex.split(interpolate(services[service]["command"], shell_env))

    def healthy(service: str, index: int):
        agent = str(node_ports(index)["dashboard-agent-listen-port"])
        test = [interpolate(w, shell_env).replace(f":{AGENT_PORT}/", f":{agent}/")
                for w in services[service]["healthcheck"]["test"]]
        argv = test[1:] if test[0] == "CMD" else ["sh", "-c", test[1]]
        return lambda: subprocess.run(netns + argv, cwd=app, env=env, capture_output=True, text=True, timeout=60)

    logs, procs = [], []

    def start(service: str, index: int):
        log = scratch / f"{service}.log"
        logs.append(log)
        procs.append(subprocess.Popen(netns + command(service) + node_flags(index, scratch), cwd=app, env=env,
                                      stdout=log.open("w"), stderr=subprocess.STDOUT))

    try:
        start("head", 0)
        wait_for(healthy("head", 0), "head healthy", 120, logs)
        for i, worker in enumerate(WORKERS, 1):  # compose starts both once the head is healthy
            start(worker, i)
        for i, worker in enumerate(WORKERS, 1):
            wait_for(healthy(worker, i), f"{worker} healthy", 120, logs)
        programs = [Path(c.split()[0]).name for c in marked_processes(scratch).values() if c]
        # the leftover check below sees Ray's own processes: each node's raylet, the head's GCS
        assert programs.count("raylet") == 1 + len(WORKERS) and programs.count("gcs_server") == 1, programs
        job = subprocess.run(netns + command("job") + JOB_OVERRIDES, cwd=app, env=env, capture_output=True,
                             text=True, timeout=300)
    finally:
        left = stop(procs[::-1], scratch)  # workers first, as compose stops dependents before the head
    return job, app / "runs", left


@CLUSTER_TIMEOUT
def test_the_compose_job_runs_on_the_compose_cluster(cluster_job):
    job, runs, _ = cluster_job
    assert job.returncode == 0, job.stdout[-5000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout
    comparison = json.loads((runs / "quickstart" / "comparison.json").read_text())
    assert [r["method"] for r in comparison["runs"]] == ["backprop", "dgl", "dni"]
    for run in comparison["runs"]:
        run_dir = runs.parent / run["run_dir"]  # relative to the driver's working directory, the head's /app
        assert run_dir.parent == runs / "quickstart"  # the default output.dir: /app/runs, compose's volume
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["runtime"] == "ray" and summary["steps"] == 5
        nodes = [s["node_id"] for s in summary["stage_info"]]
        assert len(set(nodes)) == 2, summary["stage_info"]  # SPREAD: one stage on each worker


@CLUSTER_TIMEOUT
def test_the_compose_cluster_leaves_no_process(cluster_job):
    _, _, left = cluster_job
    assert not left, f"still running after SIGTERM to every `ray start` (killed since): {left}"


@CLUSTER_TIMEOUT
def test_the_tensorboard_service_serves_the_runs(cluster_job, netns, image_app, scratch):
    app, site = image_app
    runs = cluster_job[1]
    assert runs.is_dir()
    env = {**package_env(site), MARKER: str(scratch), "HOME": str(scratch / "home")}
    argv = shlex.split(interpolate(compose()["services"]["tensorboard"]["command"], {}))
    port = argv[argv.index("--port") + 1]
    log = scratch / "tensorboard.log"
    board = subprocess.Popen(netns + argv, cwd=app, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        fetch = ("import sys, urllib.request\n"
                 f"sys.exit(urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=5).status != 200)")
        wait_for(lambda: subprocess.run(netns + [sys.executable, "-c", fetch], capture_output=True, text=True),
                 "TensorBoard answers", 90, [log])
    finally:
        left = stop([board], scratch, grace_s=20)
    assert not left, left
