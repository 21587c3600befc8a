"""Deployment files (docker cannot run here): the compose file is valid against the Compose
Specification's JSON schema (as vendored by check-jsonschema), every command it runs exists in the
project, the Dockerfile installs the way the README does, and .env.example documents every setting."""

from __future__ import annotations

import json
import re
import shlex
from importlib import resources
from pathlib import Path
from typing import Any

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


# Multi-node examples (README "Scaling"): torchrun under Slurm and Kubernetes running `tvkd train`.
SLURM = ROOT / "deploy" / "slurm" / "tvkd-train.sbatch"
KUBERNETES = ROOT / "deploy" / "kubernetes" / "tvkd-train-job.yaml"
# Values for the shell variables of the Slurm script's command line.
SLURM_VALUES = {
    "SLURM_JOB_NUM_NODES": "2", "GPUS_PER_NODE": "8", "RDZV_PORT": "29500", "SLURM_JOB_ID": "42",
    "PARALLEL": "fsdp",
}  # fmt: skip


def _torchrun_then_tvkd(argv: list[str]) -> tuple[Any, Any]:
    """(torchrun's arguments, tvkd's) of `torchrun ... -m tvkd.cli train ...`, each parsed by its
    own parser (SystemExit, a failure, on a flag either does not accept)."""
    from torch.distributed.run import get_args_parser

    assert argv[0] == "torchrun", argv
    launcher = get_args_parser().parse_args(argv[1:])
    assert launcher.module and launcher.training_script == "tvkd.cli"
    tvkd_args = build_parser().parse_args(launcher.training_script_args)
    assert tvkd_args.func.__module__ == "tvkd.cli.train"  # `tvkd train`
    return launcher, tvkd_args


def _check_world(launcher: Any, tvkd_args: Any) -> None:
    """The job's num_nodes × num_processes is the torchrun world the example starts."""
    from tvkd.cli.train import build_config

    config = build_config(tvkd_args)
    assert (config.num_nodes, config.num_processes) == (int(launcher.nnodes), int(launcher.nproc_per_node))
    assert launcher.rdzv_backend == "c10d" and launcher.rdzv_endpoint


def test_the_slurm_example_parses_and_uses_flags_the_cli_accepts():
    import subprocess

    result = subprocess.run(["bash", "-n", str(SLURM)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = SLURM.read_text()
    assert re.search(r"^#SBATCH --nodes=\d+$", text, re.M) and "--ntasks-per-node=1" in text
    command = re.search(r"^srun .*?torchrun \\\n(?:.*\\\n)*.*[^\\]\n", text, re.M | re.S)
    assert command, "an srun ... torchrun command"
    line = re.sub(r"\\\n", " ", command.group(0))
    line = re.sub(r"\$\{?(\w+)\}?", lambda m: SLURM_VALUES.get(m.group(1), f"/x/{m.group(1).lower()}"), line)
    argv = shlex.split(line)
    launcher, tvkd_args = _torchrun_then_tvkd(argv[argv.index("torchrun") :])
    assert launcher.rdzv_endpoint == "/x/head_node:29500"  # the first node of the allocation
    _check_world(launcher, tvkd_args)


def test_the_kubernetes_example_parses_and_uses_flags_the_cli_accepts():
    docs = list(yaml.safe_load_all(KUBERNETES.read_text()))
    service = next(d for d in docs if d["kind"] == "Service")
    job = next(d for d in docs if d["kind"] == "Job")
    spec = job["spec"]
    assert service["spec"]["clusterIP"] == "None" and spec["completionMode"] == "Indexed"
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"]
    container = pod["containers"][0]
    launcher, tvkd_args = _torchrun_then_tvkd(container["command"] + container["args"])
    # The rendezvous is pod 0 through the headless Service; one pod per node.
    assert launcher.rdzv_endpoint.startswith(f"{job['metadata']['name']}-0.{service['metadata']['name']}:")
    assert spec["completions"] == spec["parallelism"] == int(launcher.nnodes)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == int(launcher.nproc_per_node)
    _check_world(launcher, tvkd_args)
