"""Settings: SAFETRAIN_* variables, the embedded defaults, and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from backend.config import Settings


def test_embedded_defaults_live_under_the_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SAFETRAIN_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.delenv("SAFETRAIN_DATABASE_URL", raising=False)
    monkeypatch.delenv("SAFETRAIN_BROKER_URL", raising=False)
    settings = Settings()
    assert settings.database_url == f"sqlite:///{tmp_path / 'var' / 'safetrain.db'}"
    assert settings.broker_url == f"sqla+sqlite:///{tmp_path / 'var' / 'broker.db'}"
    assert settings.files_dir == tmp_path / "var" / "files"
    assert settings.job_dir("ftjob-1") == tmp_path / "var" / "jobs" / "ftjob-1"
    assert settings.allow_hub_models is False and settings.environment == "development"


def test_variables_are_read_with_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFETRAIN_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("SAFETRAIN_MAX_UPLOAD_BYTES", "1024")
    monkeypatch.setenv("SAFETRAIN_DATABASE_URL", "postgresql+psycopg://u@db/safetrain")
    settings = Settings()
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert settings.max_upload_bytes == 1024
    assert settings.database_url == "postgresql+psycopg://u@db/safetrain"
    monkeypatch.setenv("SAFETRAIN_CORS_ORIGINS", '["https://c.example"]')
    assert Settings().cors_origins == ["https://c.example"]


def test_production_refuses_the_default_secret_and_bad_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFETRAIN_ENVIRONMENT", "production")
    with pytest.raises(ValidationError, match="SAFETRAIN_SECRET_KEY"):
        Settings()
    monkeypatch.setenv("SAFETRAIN_SECRET_KEY", "a-real-secret")
    assert Settings().environment == "production"
    with pytest.raises(ValidationError, match="VISIBILITY_TIMEOUT"):
        Settings(visibility_timeout_seconds=30, heartbeat_expiry_seconds=60)
