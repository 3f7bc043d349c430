"""docker-compose.yml and Dockerfile.gpu agree with the code: commands, settings, requirement files."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from backend.cli import build_parser
from backend.config import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile.gpu").read_text()
# Values for the variables compose reads from the operator's shell.
SHELL_ENV = {"SAFETRAIN_SECRET_KEY": "0123456789abcdef" * 4, "POSTGRES_PASSWORD": "pw"}
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|:\?)(?P<arg>[^}]*))?\}")


def interpolate(value: str, shell: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} substitution."""

    def replace(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        if shell.get(name):
            return shell[name]
        if op == ":-":
            return arg
        if op == ":?":
            raise KeyError(f"compose refuses to start without {name}: {arg}")
        return ""

    return _VARIABLE.sub(replace, value)


def service_env(name: str, shell: dict[str, str] = SHELL_ENV) -> dict[str, str]:
    environment = SERVICES[name].get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {key: interpolate(str(value), shell) for key, value in environment.items()}


def command_of(name: str) -> list[str]:
    command = SERVICES[name]["command"]
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key in [key for key in os.environ if key.startswith("SAFETRAIN_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


SAFETRAIN_SERVICES = [name for name in SERVICES if any(k.startswith("SAFETRAIN_") for k in service_env(name))]


def test_every_safetrain_variable_is_a_setting() -> None:
    fields = {f"SAFETRAIN_{name.upper()}" for name in Settings.model_fields}
    used = {key for name in SERVICES for key in service_env(name) if key.startswith("SAFETRAIN_")}
    assert used, "compose sets no SAFETRAIN_* variable"
    assert used <= fields, f"compose sets variables no setting reads: {sorted(used - fields)}"


@pytest.mark.parametrize("name", SAFETRAIN_SERVICES)
def test_service_environment_builds_the_production_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from(service_env(name), monkeypatch)
    assert str(settings.environment).endswith("production")
    assert str(settings.database_url).startswith("postgresql+psycopg://safetrain:pw@postgres:5432/")
    assert str(settings.broker_url) == "redis://redis:6379/0"
    assert Path(settings.data_dir) == Path("/data")
    assert Path(settings.models_dir) == Path("/models")


def test_compose_refuses_to_start_without_a_secret() -> None:
    with pytest.raises(KeyError, match="SAFETRAIN_SECRET_KEY"):
        service_env("api", shell={})


def test_api_and_worker_share_one_configuration() -> None:
    api, worker, migrate = service_env("api"), service_env("worker"), service_env("migrate")
    for key in ("SAFETRAIN_DATABASE_URL", "SAFETRAIN_BROKER_URL", "SAFETRAIN_DATA_DIR", "SAFETRAIN_SECRET_KEY"):
        assert api[key] == worker[key] == migrate[key], key


@pytest.mark.parametrize(("name", "subcommand"), [("api", "api"), ("worker", "worker"), ("migrate", "migrate")])
def test_commands_are_safetrain_subcommands(name: str, subcommand: str) -> None:
    command = command_of(name)
    assert command[0] == "safetrain"
    args = build_parser().parse_args(command[1:])  # the real parser: unknown flags fail here
    assert args.command == subcommand
    assert args.func.__name__ == f"_cmd_{subcommand}"


def test_api_listens_on_all_interfaces_at_the_published_port() -> None:
    args = build_parser().parse_args(command_of("api")[1:])
    assert args.host == "0.0.0.0"
    assert any(str(port).endswith(f":{args.port}") for port in SERVICES["api"]["ports"])


def test_api_and_worker_wait_for_migrations() -> None:
    for name in ("api", "worker"):
        depends = SERVICES[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_api_and_worker_share_the_data_volume_and_models() -> None:
    mounts = {name: {v.split(":")[1]: v.split(":")[0] for v in SERVICES[name]["volumes"]} for name in ("api", "worker")}
    data_dir = service_env("api")["SAFETRAIN_DATA_DIR"]
    models_dir = service_env("api")["SAFETRAIN_MODELS_DIR"]
    assert mounts["api"][data_dir] == mounts["worker"][data_dir]
    assert mounts["api"][data_dir] in COMPOSE["volumes"], "uploads and adapters need a named volume"
    assert mounts["api"][models_dir] == mounts["worker"][models_dir]


def test_worker_reserves_an_nvidia_gpu() -> None:
    devices = SERVICES["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    concurrency = build_parser().parse_args(command_of("worker")[1:]).concurrency
    assert concurrency == sum(int(d.get("count", 1)) for d in devices), "one training process per GPU"


def test_redis_never_evicts_and_keeps_an_append_only_file() -> None:
    command = command_of("redis")
    assert command[0] == "redis-server"
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert options["--maxmemory-policy"] == "noeviction"
    assert options["--appendonly"] == "yes"
    assert any(v.split(":")[0] in COMPOSE["volumes"] for v in SERVICES["redis"]["volumes"])


def test_postgres_keeps_its_data_in_a_volume() -> None:
    volumes = {v.split(":")[1]: v.split(":")[0] for v in SERVICES["postgres"]["volumes"]}
    assert volumes["/var/lib/postgresql/data"] in COMPOSE["volumes"]
    env = service_env("postgres")
    url = service_env("api")["SAFETRAIN_DATABASE_URL"]
    assert url == f"postgresql+psycopg://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}@postgres:5432/{env['POSTGRES_DB']}"


def test_flower_watches_the_workers_broker() -> None:
    command = " ".join(command_of("flower"))
    assert f"--broker={service_env('worker')['SAFETRAIN_BROKER_URL']}" in command
    assert "flower" in command


def _requirement_files(text: str) -> set[str]:
    return set(re.findall(r"-r\s+(\S+)", text))


def test_dockerfile_installs_the_same_requirement_files_as_the_makefile() -> None:
    makefile = (ROOT / "Makefile").read_text()
    expected = _requirement_files(makefile) - {"requirements-dev.txt"}
    assert expected == {"backend/training/requirements_training.txt", "requirements-service.txt"}
    assert _requirement_files(DOCKERFILE) == expected
    copied = set(re.findall(r"^COPY\s+(\S+)\s", DOCKERFILE, flags=re.MULTILINE))
    assert expected <= copied
    assert "pip install --no-deps -e ." in DOCKERFILE


def test_dockerfile_uses_the_cuda_build_of_the_pinned_torch() -> None:
    pins = (ROOT / "backend/training/requirements_training.txt").read_text()
    torch_pin = re.search(r"^torch==(\S+)$", pins, flags=re.MULTILINE)
    assert torch_pin is not None
    assert f"ARG TORCH_VERSION={torch_pin[1]}" in DOCKERFILE
    assert re.search(r"ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu\d+", DOCKERFILE)
    assert '"torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"' in DOCKERFILE
    base = re.search(r"ARG CUDA_IMAGE=(\S+)", DOCKERFILE)
    assert base is not None and base[1].startswith("nvidia/cuda:") and "runtime" in base[1]
    assert "python3.11 -m venv" in DOCKERFILE


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", "var", "models", ".git"} <= ignored
