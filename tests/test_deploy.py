"""Deployment files (docker cannot run here): the compose file is valid against the Compose
Specification's JSON schema (as vendored by check-jsonschema), every command it runs exists in the
project, the Dockerfile installs the way the README does, and .env.example documents every setting."""

from __future__ import annotations

import json
import re
import shlex
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml

from tvkd.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def compose_schema() -> dict:
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads(vendor.joinpath("compose-spec.json").read_text())


def test_compose_file_is_valid_against_the_compose_spec():
    schema = compose_schema()
    jsonschema.validate(COMPOSE, schema)
    # The validator itself must be able to fail: a wrong type is caught.
    broken = json.loads(json.dumps(COMPOSE))
    broken["services"]["api"]["ports"] = "8000:8000"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_compose_has_the_services_health_checks_and_gpu_reservation():
    services = COMPOSE["services"]
    wanted = {"redis", "postgres", "api", "worker-default", "worker-gpu", "worker-cpu", "dashboard"}
    assert wanted <= set(services)
    for name in ("redis", "postgres", "api", "dashboard"):
        assert "healthcheck" in services[name], name
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert services["worker-gpu"]["profiles"] == ["gpu"] and services["worker-cpu"]["profiles"] == ["cpu"]
    assert {"tvkd-data", "postgres-data"} <= set(COMPOSE["volumes"])


def _tvkd_commands() -> list[list[str]]:
    out = []
    for svc in COMPOSE["services"].values():
        cmd = svc.get("command")
        if isinstance(cmd, str):
            cmd = shlex.split(cmd)
        if cmd and cmd[0] == "tvkd":
            out.append(cmd[1:])
    docker_cmd = re.search(r"^CMD (\[.*\])$", (ROOT / "Dockerfile").read_text(), re.M)
    assert docker_cmd, "Dockerfile has an exec-form CMD"
    out.append(json.loads(docker_cmd.group(1))[1:])
    return out


@pytest.mark.parametrize("argv", _tvkd_commands(), ids=lambda a: " ".join(a[:3]))
def test_every_command_run_by_compose_exists(argv):
    parser = build_parser()
    args = parser.parse_args(argv)  # SystemExit (a failure) on an unknown command or flag
    assert callable(args.func)


def test_dockerfile_installs_like_the_readme():
    text = (ROOT / "Dockerfile").read_text()
    assert "scripts/setup.sh service,dashboard" in text  # the same script as the README's commands
    for path in re.findall(r"^COPY (\S+)", text, re.M):
        if not path.startswith("--"):
            assert (ROOT / path).exists(), path


def test_env_example_documents_every_setting():
    from service.settings import Settings

    text = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^(TVKD_[A-Z_]+)=", text, re.M))
    wanted = {f"TVKD_{name.upper()}" for name in Settings.model_fields}
    assert wanted <= documented, sorted(wanted - documented)


def test_dashboard_is_published_on_loopback_by_default():
    """The dashboard (behind its login) is reachable from the host only, unless the operator
    sets TVKD_DASHBOARD_PUBLISH; the API keeps its own key check."""
    ports = COMPOSE["services"]["dashboard"]["ports"]
    assert ports
    for spec in ports:
        default = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", spec)  # compose's ${VAR:-default}
        assert default.startswith("127.0.0.1:"), spec
