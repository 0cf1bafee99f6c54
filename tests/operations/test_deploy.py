"""deploy/ and monitoring/ agree with the code.

Every deploy file is parsed and checked against the modules it must follow: the queues of
workers/app.py (and the Redis lists Celery keeps for them), the settings pipelines/config.py
reads, the commands and ports of deploy/services.py and the metric names of
pipelines/metrics.py. promtool checks the Prometheus config and alert rules and runs their
unit tests; kubectl (when installed) renders the kustomization. A slow test runs the
compose file where a Compose implementation and the images can be had.
"""

from __future__ import annotations

import ast
import base64
import functools
import gzip
import io
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy import services
from tests.client import RegistryClient, sha256
from workers.app import QUEUES, celery_app

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
MONITORING = REPO / "monitoring"
DASHBOARD = MONITORING / "grafana" / "duphunter.json"

# Settings the deploy files set before pipelines/config.py reads them: the lead wires the
# worker exporter (DUPHUNTER_METRICS_PORT) in parallel. Remove a name once config.py has it.
AWAITED_SETTINGS: frozenset[str] = frozenset()
# Variables of other software that DupHunter's own image sets.
THIRD_PARTY_ENV = frozenset(
    {
        "PATH",
        "PYTHONUNBUFFERED",
        "PYTHONDONTWRITEBYTECODE",
        "PROMETHEUS_MULTIPROC_DIR",
        "FLOWER_BASIC_AUTH",
    }
    | set(services.PROCESS_ENV)
)
# Other images' containers: only their own variables.
IMAGE_ENV_PREFIXES = {
    "quay.io/minio/minio": "MINIO_",
    "grafana/grafana": "GF_",
    "redis:": "REDISCLI_",
}
# What the compose file asks of whoever starts it, besides DupHunter's own settings.
COMPOSE_INPUTS = frozenset({"REDIS_PASSWORD", "FLOWER_BASIC_AUTH", "HTPASSWD_FILE"})
# Variables that hold a credential, in any container of any deploy file.
CREDENTIAL_VARIABLES = re.compile(
    r"PASSWORD|SECRET|ACCESS_KEY|ROOT_USER|BASIC_AUTH|REDIS_URL|CLI_AUTH"
)
REQUIRED = re.compile(r"\$\{([A-Z0-9_]+):\?[^}]+\}")
SECRET_SETTINGS = frozenset(
    {"DUPHUNTER_S3_ACCESS_KEY", "DUPHUNTER_S3_SECRET_KEY", "DUPHUNTER_REDIS_URL"}
)
METRIC_KINDS = {
    "Counter": "counter",
    "CounterMetricFamily": "counter",
    "Histogram": "histogram",
    "HistogramMetricFamily": "histogram",
    "Summary": "summary",
    "Gauge": "gauge",
    "GaugeMetricFamily": "gauge",
    "_gauge": "gauge",
}
SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "gauge": ("",),
}
METRIC_NAME = re.compile(r"\bduphunter_[a-z0-9_]+\b")


# ------------------------------------------------------------------ what the code says
@functools.cache
def settings() -> set[str]:
    """Every DUPHUNTER_* variable pipelines/config.py reads (its `_env("NAME", ...)` calls)."""
    tree = ast.parse((REPO / "pipelines" / "config.py").read_text())
    names = {
        f"DUPHUNTER_{node.args[0].value}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("_env", "_optional_path", "_flag")
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    }
    assert "DUPHUNTER_REDIS_URL" in names, "pipelines/config.py no longer reads settings by _env"
    return names


def allowed_env() -> set[str]:
    return settings() | AWAITED_SETTINGS | THIRD_PARTY_ENV


@functools.cache
def defined_series() -> dict[str, str]:
    """Every series name pipelines/metrics.py exposes -> the metric it belongs to."""
    tree = ast.parse((REPO / "pipelines" / "metrics.py").read_text())
    series: dict[str, str] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        kind = METRIC_KINDS.get(node.func.id)
        first = node.args[0] if node.args else None
        if kind and isinstance(first, ast.Constant) and isinstance(first.value, str):
            base = first.value.removesuffix("_total") if kind == "counter" else first.value
            for suffix in SERIES_SUFFIXES[kind]:
                series[base + suffix] = first.value
    assert series, "no metric found in pipelines/metrics.py"
    return series


def queue_lists(queue: str) -> list[str]:
    """The Redis lists Celery's Redis transport keeps for a queue: the queue's name for
    priority 0, `<queue><sep><n>` for each further priority step."""
    options = celery_app.conf.broker_transport_options
    steps: list[int] = options.get("priority_steps", [0])
    sep: str = options.get("sep", "\x06\x16")
    return [queue if step == 0 else f"{queue}{sep}{step}" for step in steps]


def option(command: list[str], flag: str) -> str:
    assert flag in command, f"{flag} missing from {command}"
    return command[command.index(flag) + 1]


def long_option(command: list[str], name: str) -> str:
    values = [arg.split("=", 1)[1] for arg in command if arg.startswith(f"{name}=")]
    assert len(values) == 1, f"{name}= missing from {command}"
    return values[0]


def role(command: list[str]) -> str:
    """api, worker:<queue>, beat, flower, or what else the command is."""
    if command[:1] == ["gunicorn"]:
        return "api"
    if command[:3] == ["celery", "-A", services.CELERY_APP] and len(command) > 3:
        kind = command[3]
        return f"worker:{option(command, '-Q')}" if kind == "worker" else kind
    return "other"


def expected_command(command: list[str]) -> list[str]:
    """The deploy/services.py command `command` claims to be, built from its own values."""
    kind = role(command)
    if kind == "api":
        bind = option(command, "--bind")
        processes, threads = int(option(command, "--workers")), int(option(command, "--threads"))
        return services.api_command(None, bind, processes, threads)
    if kind.startswith("worker:"):
        name = option(command, "-n").removesuffix("@%h")
        concurrency = int(option(command, "-c"))
        return services.worker_command(None, option(command, "-Q"), name, concurrency)
    if kind == "beat":
        return services.beat_command(None, Path(option(command, "--schedule")))
    if kind == "flower":
        port = int(long_option(command, "--port"))
        return services.flower_command(None, long_option(command, "--address"), port)
    raise AssertionError(f"not a DupHunter process of deploy/services.py: {command}")


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


# ------------------------------------------------------------------------ file readers
def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@functools.cache
def compose() -> dict[str, Any]:
    data = load_yaml(DEPLOY / "compose.yaml")
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def compose_services() -> dict[str, dict[str, Any]]:
    services_: dict[str, dict[str, Any]] = compose()["services"]
    return services_


def duphunter_image() -> str:
    return str(compose()["x-duphunter"]["image"])


def own_services() -> dict[str, dict[str, Any]]:
    """The compose services that run DupHunter's image."""
    image = duphunter_image()
    return {name: s for name, s in compose_services().items() if s.get("image") == image}


def by_role(commands: dict[str, list[str]]) -> dict[str, list[str]]:
    roles: dict[str, list[str]] = {}
    for name, command in commands.items():
        roles.setdefault(role(command), []).append(name)
    return roles


def k8s_resources() -> list[str]:
    resources: list[str] = load_yaml(K8S / "kustomization.yaml")["resources"]
    return resources


@functools.cache
def k8s_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name in k8s_resources():
        docs += [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]
    return docs


def k8s_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in k8s_docs() if doc["kind"] == kind}


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = pod_spec(workload)["containers"]
    return found


def workloads() -> dict[str, dict[str, Any]]:
    return {**k8s_kind("Deployment"), **k8s_kind("Job")}


def k8s_commands() -> dict[str, list[str]]:
    """Each workload's container command (args, run by the image's entrypoint)."""
    return {name: containers(w)[0]["args"] for name, w in workloads().items()}


def k8s_deployment_for(component: str) -> dict[str, Any]:
    (found,) = [
        d
        for d in k8s_kind("Deployment").values()
        if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
        == component
    ]
    return found


def container_port(workload: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (a number or a container port's name) as a number."""
    ports = {p["name"]: p["containerPort"] for c in containers(workload) for p in c["ports"]}
    return ports[port] if isinstance(port, str) else port


@functools.cache
def dockerfile() -> list[tuple[int, str, str]]:
    """(stage, INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions: list[tuple[int, str, str]] = []
    stage = -1
    for line in joined.splitlines():
        if not line.strip():
            continue
        word, _, rest = line.strip().partition(" ")
        stage += word.upper() == "FROM"
        instructions.append((stage, word.upper(), " ".join(rest.split())))
    return instructions


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for _stage, word, rest in dockerfile():
        if word == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))  # type: ignore[misc]
    return env


def alert_rules() -> list[dict[str, Any]]:
    groups = load_yaml(MONITORING / "alerts.yml")["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expression) of every query of the dashboard."""
    data = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in data["panels"]
        for target in panel.get("targets", [])
    ]


# --------------------------------------------------------------------------- compose
def test_compose_runs_every_process_with_the_services_module_command() -> None:
    commands = {name: s["command"] for name, s in own_services().items() if "command" in s}
    for name, command in commands.items():
        if role(command) != "other":
            assert command == expected_command(command), name
    roles = by_role(commands)
    assert {r.removeprefix("worker:") for r in roles if r.startswith("worker:")} == set(QUEUES)
    for kind in ["api", "beat", "flower", *(f"worker:{q}" for q in QUEUES)]:
        assert len(roles.get(kind, [])) == 1, f"compose needs exactly one {kind} service"


def test_compose_ports_are_those_of_the_services_module() -> None:
    own = own_services()
    roles = by_role({name: s["command"] for name, s in own.items() if "command" in s})
    (api,), (flower,) = roles["api"], roles["flower"]
    assert port_of(option(own[api]["command"], "--bind")) == services.API_PORT
    assert int(long_option(own[flower]["command"], "--port")) == services.FLOWER_PORT
    for name, port in ((api, services.API_PORT), (flower, services.FLOWER_PORT)):
        published = [int(str(p).rsplit(":", 1)[1]) for p in own[name].get("ports", [])]
        assert published == [port], f"{name} must publish its port {port}"
    for queue in QUEUES:
        (worker,) = roles[f"worker:{queue}"]
        env = own[worker]["environment"]
        assert env.get("DUPHUNTER_METRICS_PORT") == str(services.WORKER_METRICS_PORT), worker


def test_compose_sets_only_known_variables() -> None:
    allowed = allowed_env()
    for name, service in compose_services().items():
        env = service.get("environment") or {}
        assert isinstance(env, dict), f"{name}: environment as a mapping, please"
        image = str(service.get("image", ""))
        prefix = next((p for i, p in IMAGE_ENV_PREFIXES.items() if image.startswith(i)), None)
        for variable in env:
            if prefix:
                assert variable.startswith(prefix), f"{name} sets {variable}"
            else:
                assert variable in allowed, f"{name} sets {variable}, not a DupHunter setting"
    text = (DEPLOY / "compose.yaml").read_text()
    for variable in re.findall(r"\$\{([A-Z0-9_]+)", text):
        assert variable in allowed | COMPOSE_INPUTS or variable.startswith("GF_"), variable


def test_compose_file_follows_the_compose_specification() -> None:
    checker = Path(sys.executable).parent / "check-jsonschema"
    if not checker.exists():
        pytest.skip("check-jsonschema (dev extras) is not installed")
    done = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose.yaml")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def expand_ellipses(pattern: str) -> list[str]:
    """MinIO's `{a...b}` expansion: http://minio{1...2}/d{1...2} -> 4 endpoints."""
    match = re.search(r"\{(\d+)\.\.\.(\d+)\}", pattern)
    if not match:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    numbers = range(int(match[1]), int(match[2]) + 1)
    return [e for n in numbers for e in expand_ellipses(f"{head}{n}{tail}")]


def test_compose_minio_is_distributed_over_four_drives() -> None:
    everything = compose_services()
    minio = {n: s for n, s in everything.items() if "minio/minio" in str(s.get("image"))}
    commands = {json.dumps(s["command"]) for s in minio.values()}
    assert len(commands) == 1, "every MinIO node runs the same server command"
    command = next(iter(minio.values()))["command"]
    assert command[0] == "server"
    drives = [e for arg in command if arg.startswith("http") for e in expand_ellipses(arg)]
    assert len(drives) == 4, drives
    for drive in drives:
        host, path = re.fullmatch(r"https?://([^/:]+)(?::\d+)?(/.*)", drive).groups()  # type: ignore[union-attr]
        assert host in minio, f"{drive}: no MinIO service {host}"
        mounts = [str(v).split(":")[1] for v in minio[host].get("volumes", [])]
        assert path in mounts, f"{drive}: {host} has no volume at {path}"
    endpoint = own_services()["api"]["environment"]["DUPHUNTER_S3_ENDPOINT"]
    s3_host = endpoint.split("://")[-1].split(":")[0]
    for name, node in minio.items():
        aliases = node.get("networks", {}).get("default", {}).get("aliases", [])
        assert s3_host == name or s3_host in aliases, f"{endpoint} does not reach {name}"


def test_compose_redis_keeps_an_append_only_file() -> None:
    command = compose_services()["redis"]["command"]
    assert option(command, "--appendonly") == "yes"
    assert option(command, "--maxmemory-policy") == "noeviction"
    url = own_services()["api"]["environment"]["DUPHUNTER_REDIS_URL"]
    assert re.fullmatch(r"redis://:\$\{REDIS_PASSWORD:\?[^}]+\}@redis:6379/\d+", url), url


def test_compose_bucket_exists_before_duphunter_starts() -> None:
    everything = compose_services()
    bucket = everything["bucket"]
    minio = [n for n, s in everything.items() if "minio/minio" in str(s.get("image"))]
    assert {n: c["condition"] for n, c in bucket["depends_on"].items()} == {
        n: "service_healthy" for n in minio
    }
    for name, service in own_services().items():
        if name != "bucket":
            condition = service["depends_on"]["bucket"]["condition"]
            assert condition == "service_completed_successfully", name
    (job,) = [c for n, c in k8s_commands().items() if n == "duphunter-bucket"]
    assert bucket["command"] == job, "compose and Kubernetes create the bucket alike"


def test_compose_mounts_the_monitoring_files() -> None:
    everything = compose_services()
    mounts: dict[str, str] = {}
    for name, service in everything.items():
        for volume in service.get("volumes", []):
            source, target = str(volume).split(":")[:2]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
                mounts[target] = str((DEPLOY / source).resolve().relative_to(REPO))
    assert mounts["/etc/prometheus/prometheus.yml"] == "monitoring/prometheus.yml"
    for rule_file in load_yaml(MONITORING / "prometheus.yml")["rule_files"]:
        assert mounts[f"/etc/prometheus/{rule_file}"] == f"monitoring/{rule_file}"
    assert mounts["/etc/grafana/provisioning"] == "monitoring/grafana/provisioning"
    provider = load_yaml(MONITORING / "grafana/provisioning/dashboards/duphunter.yml")
    (folder,) = [p["options"]["path"] for p in provider["providers"]]
    assert mounts[f"{folder}/{DASHBOARD.name}"] == "monitoring/grafana/duphunter.json"


# ------------------------------------------------------------------------- prometheus
def test_prometheus_scrapes_the_api_and_every_worker_on_their_ports() -> None:
    everything = compose_services()
    roles = by_role({n: s["command"] for n, s in own_services().items() if "command" in s})
    expected_port = {roles["api"][0]: services.API_PORT}
    expected_port |= {roles[f"worker:{q}"][0]: services.WORKER_METRICS_PORT for q in QUEUES}
    scraped: dict[str, int] = {}
    for job in load_yaml(MONITORING / "prometheus.yml")["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            assert job.get("metrics_path", "/metrics") == "/metrics", job["job_name"]
            for name in sd["names"]:
                assert name in everything, f"{job['job_name']} scrapes unknown service {name}"
                scraped[name] = sd["port"]
    assert {n: scraped.get(n) for n in expected_port} == expected_port


# ------------------------------------------------------------------- alerts, dashboard
def test_alerts_and_panels_use_only_metrics_defined_in_the_code() -> None:
    series = defined_series()
    expressions = [(r["alert"], r["expr"]) for r in alert_rules()] + dashboard_targets()
    for where, expr in expressions:
        for name in METRIC_NAME.findall(expr):
            assert name in series, f"{where}: {name} is not exposed by pipelines/metrics.py"


def test_alerts_cover_what_operators_must_hear_of() -> None:
    used = {name for r in alert_rules() for name in METRIC_NAME.findall(r["expr"])}
    assert {
        "duphunter_queue_depth",
        "duphunter_restore_seconds_bucket",
        "duphunter_encoder_canary_ok",
        "duphunter_verification_failures_total",
        "duphunter_restore_failures_total",
        "duphunter_s3_errors_total",
        "duphunter_http_requests_total",
    } <= used


def test_every_metric_has_a_dashboard_panel() -> None:
    shown = {
        defined_series()[name]
        for _title, expr in dashboard_targets()
        for name in METRIC_NAME.findall(expr)
    }
    missing = set(defined_series().values()) - shown
    assert not missing, f"metrics with no panel in {DASHBOARD.name}: {sorted(missing)}"


def test_every_alert_is_explained_where_its_runbook_points() -> None:
    readme = (MONITORING / "README.md").read_text()
    headings = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in readme.splitlines()
        if line.startswith("#")
    }
    operator_guide = (REPO / "docs" / "operations.md").read_text().split("## What each alert", 1)
    assert len(operator_guide) == 2, "docs/operations.md has no '## What each alert means'"
    for rule in alert_rules():
        anchor = rule["annotations"]["runbook"].split("#", 1)[1]
        assert anchor == rule["alert"].lower() and anchor in headings, rule["alert"]
        assert rule["alert"] in operator_guide[1], f"the operator guide omits {rule['alert']}"
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]


def test_dashboard_is_provisioned_with_its_datasource() -> None:
    data = json.loads(DASHBOARD.read_text())
    sources = load_yaml(MONITORING / "grafana/provisioning/datasources/prometheus.yml")
    uids = {s["uid"] for s in sources["datasources"] if s["type"] == "prometheus"}
    ids = [panel["id"] for panel in data["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in data["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] in uids, panel["title"]
            assert panel["targets"], panel["title"]


# --------------------------------------------------------------------------- promtool
def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool comes with Debian's prometheus (deploy/system-deps.sh test)")
    return subprocess.run(
        [tool, *args], capture_output=True, text=True, timeout=120, check=False, cwd=MONITORING
    )


def test_promtool_is_a_test_dependency() -> None:
    text = (DEPLOY / "system-deps.sh").read_text()
    test_list = text.split('if [[ "${1:-}" == "test" ]]; then', 1)[1].split("fi", 1)[0]
    assert "prometheus" in re.findall(r"[a-z0-9][a-z0-9.+-]*", test_list)


@pytest.mark.parametrize(
    "args",
    [
        ("check", "rules", "alerts.yml"),
        ("check", "config", "prometheus.yml"),
        ("test", "rules", "alerts_test.yml"),
    ],
    ids=lambda args: " ".join(args),
)
def test_promtool_accepts_the_monitoring_files(args: tuple[str, ...]) -> None:
    done = promtool(*args)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Each panel query, as a recording rule: promtool parses its PromQL."""
    rules = [
        {"record": f"dashboard:query_{n}", "expr": expr.replace("$__rate_interval", "5m")}
        for n, (_title, expr) in enumerate(dashboard_targets())
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_turns_authentication_on_with_users_from_a_secret_file() -> None:
    api = own_services()["api"]
    env = api["environment"]
    assert env["DUPHUNTER_AUTH"] in ("htpasswd", "token")
    secrets = compose()["secrets"]
    (name,) = api["secrets"]
    assert env["DUPHUNTER_HTPASSWD"] == f"/run/secrets/{name}"
    assert REQUIRED.fullmatch(secrets[name]["file"]), "the users file must be asked for"


def test_compose_has_no_default_credentials() -> None:
    """Every credential is a required variable (${VAR:?why}), never a literal or a default."""
    text = (DEPLOY / "compose.yaml").read_text()
    assert not re.search(r"\$\{[A-Z0-9_]+:?-", text), "no ${VAR:-default} in the compose file"
    checked = set()
    for name, service in compose_services().items():
        for variable, value in (service.get("environment") or {}).items():
            if CREDENTIAL_VARIABLES.search(variable):
                assert REQUIRED.search(str(value)), f"{name}: {variable}={value!r}"
                checked.add(variable)
    assert {
        "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "DUPHUNTER_S3_SECRET_KEY",
        "DUPHUNTER_REDIS_URL", "GF_SECURITY_ADMIN_PASSWORD", "FLOWER_BASIC_AUTH",
    } <= checked  # fmt: skip
    redis_command = compose_services()["redis"]["command"]
    assert REQUIRED.fullmatch(option(redis_command, "--requirepass")), "Redis needs a password"


def test_compose_flower_asks_for_a_login_and_listens_on_loopback() -> None:
    roles = by_role({n: s["command"] for n, s in own_services().items() if "command" in s})
    (name,) = roles["flower"]
    flower = own_services()[name]
    assert REQUIRED.fullmatch(flower["environment"]["FLOWER_BASIC_AUTH"])
    for service in compose_services().values():
        for published in service.get("ports", []):
            assert str(published).startswith("127.0.0.1:"), published


# ------------------------------------------------------------------------- kubernetes
def test_kustomization_lists_every_manifest() -> None:
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(k8s_resources()) == on_disk
    seen: set[tuple[str, str]] = set()
    for doc in k8s_docs():
        assert doc.get("apiVersion") and doc.get("kind"), doc
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in seen, f"{key} twice"
        seen.add(key)
        assert doc["kind"] != "Secret", "secrets are referenced, never part of the manifests"


def test_kubernetes_runs_every_process_with_the_services_module_command() -> None:
    commands = k8s_commands()
    for name, command in commands.items():
        if role(command) != "other":
            assert command == expected_command(command), name
    roles = by_role(commands)
    for kind in ["api", "beat", "flower", *(f"worker:{q}" for q in QUEUES)]:
        assert len(roles.get(kind, [])) == 1, f"Kubernetes needs exactly one {kind} Deployment"
    long_running = {n for r, names in roles.items() if r != "other" for n in names}
    assert long_running <= k8s_kind("Deployment").keys(), "long-running processes: Deployments"


def test_every_queue_has_a_deployment_a_scaledobject_and_a_pdb() -> None:
    scaled = k8s_kind("ScaledObject")
    budgets = k8s_kind("PodDisruptionBudget")
    auths = k8s_kind("TriggerAuthentication")
    for queue in QUEUES:
        deployment = k8s_deployment_for(f"worker-{queue}")
        name = deployment["metadata"]["name"]
        assert "replicas" not in deployment["spec"], f"{name}: KEDA owns the replica count"
        (so,) = [s for s in scaled.values() if s["spec"]["scaleTargetRef"]["name"] == name]
        triggers = so["spec"]["triggers"]
        assert [t["metadata"]["listName"] for t in triggers] == queue_lists(queue), name
        for trigger in triggers:
            assert trigger["type"] == "redis"
            assert trigger["authenticationRef"]["name"] in auths
        formula = so["spec"]["advanced"]["scalingModifiers"]["formula"]
        assert sorted(formula.replace(" ", "").split("+")) == sorted(t["name"] for t in triggers)
        assert so["spec"]["minReplicaCount"] >= 1, f"{queue} needs a consumer for readiness"
        assert any(selects(b, deployment) for b in budgets.values()), f"no PDB for {name}"


def selects(selector_owner: dict[str, Any], workload: dict[str, Any]) -> bool:
    spec = selector_owner["spec"]
    wanted = spec["selector"].get("matchLabels", spec["selector"])
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


def test_deployments_select_their_own_pods() -> None:
    for name, deployment in k8s_kind("Deployment").items():
        assert selects(deployment, deployment), name


def test_api_service_probes_and_disruption_budget() -> None:
    api = k8s_deployment_for("api")
    (container,) = containers(api)
    assert port_of(option(container["args"], "--bind")) == services.API_PORT
    assert container_port(api, container["livenessProbe"]["httpGet"]["port"]) == services.API_PORT
    assert container["livenessProbe"]["httpGet"]["path"] == "/api/v1/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/api/v1/ready?scope=backends"
    assert container_port(api, container["readinessProbe"]["httpGet"]["port"]) == services.API_PORT
    (service,) = [s for s in k8s_kind("Service").values() if selects(s, api)]
    (port,) = service["spec"]["ports"]
    assert container_port(api, port["targetPort"]) == services.API_PORT
    (budget,) = [b for b in k8s_kind("PodDisruptionBudget").values() if selects(b, api)]
    assert budget["spec"]["minAvailable"] < api["spec"]["replicas"]


def test_worker_liveness_pings_the_worker_itself() -> None:
    for queue in QUEUES:
        (container,) = containers(k8s_deployment_for(f"worker-{queue}"))
        name = option(container["args"], "-n").replace("%h", "$HOSTNAME")
        probe = shlex.split(container["livenessProbe"]["exec"]["command"][-1])
        ping = ["celery", "-A", services.CELERY_APP, "inspect", "ping"]
        assert probe[probe.index("celery") :][:5] == ping
        assert option(probe, "--destination") == name
        ports = [p["containerPort"] for p in container["ports"]]
        assert ports == [services.WORKER_METRICS_PORT]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["DUPHUNTER_METRICS_PORT"] == str(services.WORKER_METRICS_PORT)


def test_beat_is_one_pod_that_never_overlaps_and_flower_has_its_port() -> None:
    beat = k8s_deployment_for("beat")
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"]["type"] == "Recreate"
    flower = k8s_deployment_for("flower")
    (container,) = containers(flower)
    assert int(long_option(container["args"], "--port")) == services.FLOWER_PORT
    assert container_port(flower, "http") == services.FLOWER_PORT


def test_kubernetes_secrets_by_reference_and_known_settings_only() -> None:
    allowed = allowed_env()
    config_maps = k8s_kind("ConfigMap")
    for data in (cm["data"] for cm in config_maps.values()):
        assert set(data) <= allowed, set(data) - allowed
        assert not set(data) & SECRET_SETTINGS, "secrets do not belong in a ConfigMap"
    for name, workload in workloads().items():
        for container in containers(workload):
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in config_maps, name
            names = {e["name"] for e in container.get("env", [])}
            assert names <= allowed, f"{name}: {names - allowed}"
            assert names >= SECRET_SETTINGS, f"{name} lacks its credentials"
            for entry in container.get("env", []):
                if entry["name"] in SECRET_SETTINGS:
                    assert "value" not in entry and entry["valueFrom"]["secretKeyRef"], entry


def test_kubernetes_pods_run_unprivileged_on_the_built_image() -> None:
    images = {i["name"] for i in load_yaml(K8S / "kustomization.yaml")["images"]}
    for name, workload in workloads().items():
        assert pod_spec(workload)["securityContext"]["runAsNonRoot"] is True, name
        for container in containers(workload):
            assert container["image"] in images, name
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name


def test_kubernetes_turns_authentication_on_with_users_from_the_secret() -> None:
    (config,) = k8s_kind("ConfigMap").values()
    assert config["data"]["DUPHUNTER_AUTH"] in ("htpasswd", "token")
    users = Path(config["data"]["DUPHUNTER_HTPASSWD"])
    api = k8s_deployment_for("api")
    (container,) = containers(api)
    volumes = {v["name"]: v for v in pod_spec(api)["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == users.parent]
    secret = volumes[mount["name"]]["secret"]
    assert secret["secretName"] == "duphunter-secrets" and mount["readOnly"] is True
    assert {"key": "htpasswd", "path": users.name} in secret["items"]
    assert secret["defaultMode"] & 0o007 == 0, "the users file is not world-readable"


def test_kubernetes_flower_asks_for_a_login_and_stays_in_the_namespace() -> None:
    flower = k8s_deployment_for("flower")
    (container,) = containers(flower)
    (entry,) = [e for e in container["env"] if e["name"] == "FLOWER_BASIC_AUTH"]
    assert "value" not in entry and entry["valueFrom"]["secretKeyRef"]["name"]
    (service,) = [s for s in k8s_kind("Service").values() if selects(s, flower)]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert not k8s_kind("Ingress"), "nothing is exposed through an Ingress by these files"
    policies = [p for p in k8s_kind("NetworkPolicy").values() if selects_pods(p, flower)]
    sources = [
        source
        for policy in policies
        for rule in policy["spec"].get("ingress", [])
        for source in rule.get("from", [{}])
    ]
    assert sources and all(set(source) == {"podSelector"} for source in sources), sources


def selects_pods(policy: dict[str, Any], workload: dict[str, Any]) -> bool:
    """Whether a NetworkPolicy's podSelector (labels and expressions) takes these pods."""
    selector = policy["spec"]["podSelector"]
    labels = workload["spec"]["template"]["metadata"]["labels"]
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def test_kubernetes_network_policy_denies_what_it_does_not_let_in() -> None:
    policies = k8s_kind("NetworkPolicy")
    deny = [
        p for p in policies.values()
        if p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"]
        and not p["spec"].get("ingress")
    ]  # fmt: skip
    assert deny, "a default-deny ingress policy for the namespace"
    ports: dict[str, set[int]] = {}
    for name, workload in k8s_kind("Deployment").items():
        for policy in policies.values():
            if selects_pods(policy, workload):
                for rule in policy["spec"].get("ingress", []):
                    ports.setdefault(name, set()).update(p["port"] for p in rule["ports"])
    api = k8s_deployment_for("api")["metadata"]["name"]
    flower = k8s_deployment_for("flower")["metadata"]["name"]
    assert ports.pop(api) == {services.API_PORT}
    assert ports.pop(flower) == {services.FLOWER_PORT}
    workers = {k8s_deployment_for(f"worker-{q}")["metadata"]["name"] for q in QUEUES}
    assert set(ports) == workers, "beat opens no port; every worker its metrics only"
    assert all(opened == {services.WORKER_METRICS_PORT} for opened in ports.values())


def test_kubectl_renders_the_kustomization() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the manifests were checked by parsing only")
    done = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    rendered = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    assert len(rendered) == len(k8s_docs())
    namespace = load_yaml(K8S / "kustomization.yaml")["namespace"]
    for doc in rendered:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, doc["metadata"]["name"]


# ------------------------------------------------------------------------- Dockerfile
def stage_of(name: str) -> int:
    for stage, word, rest in dockerfile():
        if word == "FROM" and rest.lower().endswith(f" as {name}"):
            return stage
    raise AssertionError(f"no stage named {name}")


def test_dockerfile_builds_the_helpers_and_copies_them_where_the_setting_points() -> None:
    build = stage_of("build")
    runs = " ".join(rest for stage, word, rest in dockerfile() if stage == build and word == "RUN")
    match = re.search(r"pipelines/encoders/gohelpers/build\.sh (\S+)", runs)
    assert match, "the build stage must run pipelines/encoders/gohelpers/build.sh"
    helpers = match[1]
    copies = [rest.split() for _s, word, rest in dockerfile() if word == "COPY"]
    destinations = {c[-1] for c in copies if c[0] == "--from=build" and c[1] == helpers}
    assert dockerfile_env()["DUPHUNTER_HELPER_DIR"] in destinations


def system_dep_packages() -> list[str]:
    """What deploy/system-deps.sh installs for `make run` (its first packages=(...))."""
    text = (DEPLOY / "system-deps.sh").read_text()
    match = re.search(r"^packages=\(([^)]*)\)", text, re.MULTILINE)
    assert match, "deploy/system-deps.sh: no packages=(...)"
    return match[1].split()


def test_dockerfile_build_stage_installs_what_the_helpers_need() -> None:
    build = stage_of("build")
    runs = " ".join(rest for stage, word, rest in dockerfile() if stage == build and word == "RUN")
    installed = set(re.findall(r"apt-get install ([^&]*)", runs)[0].split())
    # redis-server is a service of its own; everything else system-deps.sh installs is
    # what building and running the helpers needs.
    wanted = set(system_dep_packages()) - {"redis-server"}
    assert wanted <= installed, f"the build stage lacks {sorted(wanted - installed)}"


def test_dockerfile_runtime_image() -> None:
    instructions = dockerfile()
    last = max(stage for stage, _w, _r in instructions)
    runtime = [(word, rest) for stage, word, rest in instructions if stage == last]
    assert runtime[0] == ("FROM", "debian:bookworm-slim")
    users = [rest for word, rest in runtime if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "run as a non-root user"
    env = dockerfile_env()
    assert set(env) <= allowed_env(), set(env) - allowed_env()
    assert env["PROMETHEUS_MULTIPROC_DIR"]
    exposed = {int(p) for word, rest in runtime if word == "EXPOSE" for p in rest.split()}
    assert exposed == {services.API_PORT, services.FLOWER_PORT, services.WORKER_METRICS_PORT}
    (cmd,) = [json.loads(rest) for word, rest in runtime if word == "CMD"]
    assert role(cmd) == "api" and cmd == expected_command(cmd)
    assert port_of(option(cmd, "--bind")) == services.API_PORT
    (entrypoint,) = [json.loads(rest) for word, rest in runtime if word == "ENTRYPOINT"]
    assert 'exec "$@"' in " ".join(entrypoint), "the entrypoint must exec the command"
    for word, rest in runtime:
        if word == "COPY" and not rest.startswith("--from"):
            raise AssertionError(f"the runtime stage copies from the build context: {rest}")


def test_dockerfile_copies_what_exists() -> None:
    for _stage, word, rest in dockerfile():
        if word == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert (REPO / source).exists(), source


# --------------------------------------------------------------- the stack, for real
COMPOSE_PROJECT = "duphunter-test"


def compose_command() -> tuple[list[str] | None, str]:
    """A Compose implementation and its engine, or None and why not."""
    docker = shutil.which("docker")
    if docker and run_ok([docker, "info"]):
        if run_ok([docker, "compose", "version"]):
            return [docker, "compose"], docker
        if shutil.which("docker-compose"):
            return [str(shutil.which("docker-compose"))], docker
    podman = shutil.which("podman")
    if podman and shutil.which("podman-compose"):
        return [str(shutil.which("podman-compose"))], podman
    engines = "no Docker daemon answers" if docker else "no docker CLI"
    return None, (
        f"no Compose implementation can run here ({engines}; docker compose plugin, "
        "docker-compose, podman-compose: none usable)"
    )


def run_ok(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=20, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def missing_images(engine: str) -> list[str]:
    """The third-party images of the compose file that the engine does not hold. This
    machine reaches no container registry, so they cannot be pulled here."""
    images = {str(s["image"]) for s in compose_services().values() if "image" in s}
    images |= {str(compose()["x-minio"]["image"])}
    images.discard(duphunter_image())
    images.add("debian:bookworm-slim")  # the Dockerfile's base
    return sorted(i for i in images if not run_ok([engine, "image", "inspect", i]))


SMOKE_USER = ("smoke", secrets.token_hex(12))


def compose_inputs(directory: Path) -> dict[str, str]:
    """Every credential the compose file requires, generated, and a users file."""
    users = directory / "htpasswd"
    subprocess.run(["htpasswd", "-B", "-c", "-b", str(users), *SMOKE_USER], check=True,
                   capture_output=True)  # fmt: skip
    users.chmod(0o644)
    return {
        "DUPHUNTER_S3_ACCESS_KEY": "duphunter",
        "DUPHUNTER_S3_SECRET_KEY": secrets.token_hex(24),
        "REDIS_PASSWORD": secrets.token_hex(24),
        "FLOWER_BASIC_AUTH": f"admin:{secrets.token_hex(16)}",
        "GF_SECURITY_ADMIN_PASSWORD": secrets.token_hex(16),
        "HTPASSWD_FILE": str(users),
    }


@pytest.fixture
def compose_stack(tmp_path: Path) -> Iterator[list[str]]:
    tool, engine_or_reason = compose_command()
    if tool is None:
        pytest.skip(engine_or_reason + WHY_NOT_HERE)
    missing = missing_images(engine_or_reason)
    if missing:
        pytest.skip(f"images not held locally: {', '.join(missing)}." + WHY_NOT_HERE)
    base = [*tool, "-f", str(DEPLOY / "compose.yaml"), "-p", COMPOSE_PROJECT]
    env = {**os.environ, **compose_inputs(tmp_path)}
    up = subprocess.run([*base, "up", "-d", "--build"], capture_output=True, text=True,
                        timeout=3600, check=False, env=env)  # fmt: skip
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield base
    finally:
        subprocess.run([*base, "down", "-v"], capture_output=True, timeout=600, check=False,
                       env=env)  # fmt: skip


WHY_NOT_HERE = (
    " The compose file needs the MinIO, Redis, Prometheus and Grafana images and the "
    "Debian base image from a container registry, which this machine cannot reach (only "
    "PyPI, Debian and npm), and the image build needs apt-get and pip from inside the "
    "build. Run `pytest -m slow tests/operations/test_deploy.py` where Docker Hub and quay.io "
    "answer."
)


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return 0


@pytest.mark.slow
def test_compose_stack_serves_and_is_scraped(compose_stack: list[str]) -> None:
    deadline = time.monotonic() + 600
    api = f"http://127.0.0.1:{services.API_PORT}"
    while http_status(f"{api}/api/v1/ready") != 200:
        assert time.monotonic() < deadline, "the API did not become ready within 10 minutes"
        time.sleep(5)
    assert http_status(f"{api}/v2/") == 401  # authentication is on
    assert http_status(f"http://127.0.0.1:{services.FLOWER_PORT}/healthcheck") == 200
    assert http_status(f"http://127.0.0.1:{services.FLOWER_PORT}/") == 401
    with urllib.request.urlopen("http://127.0.0.1:9090/api/v1/targets", timeout=10) as reply:
        targets = json.load(reply)["data"]["activeTargets"]
    up = {t["labels"]["job"] for t in targets if t["health"] == "up"}
    assert {"duphunter-api", *(f"duphunter-worker-{q}" for q in QUEUES)} <= up, targets
    # a push, deduplicated by the ingest worker on MinIO, pulls back byte-exact
    login = "Basic " + base64.b64encode(":".join(SMOKE_USER).encode()).decode()
    client = RegistryClient(api, login)
    layer = gzip.compress(text_tar(), 6, mtime=0)
    _digest, manifest = client.push_image("compose/smoke", "v1", [layer])
    digest = manifest["layers"][0]["digest"]
    while True:
        stats = json.loads(client.request("GET", "/api/v1/stats").data)
        if "deduplicated" in json.dumps(stats.get("layers", {})):
            break
        assert time.monotonic() < deadline, stats
        time.sleep(2)
    pulled = client.request("GET", f"/v2/compose/smoke/blobs/{digest}")
    assert pulled.status == 200 and sha256(pulled.data) == digest


def text_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for n in range(20):
            content = b"line %d of a text file\n" % n * 2000
            info = tarfile.TarInfo(f"file-{n}.txt")
            info.size, info.mtime = len(content), 1_700_000_000
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()
