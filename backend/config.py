"""One Settings object for the whole service; every SAFETRAIN_* variable lives here."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_SECRET_KEY = "change-me-in-production"


class Settings(BaseSettings):
    """The service's configuration, read from SAFETRAIN_* environment variables (or a .env file)."""

    model_config = SettingsConfigDict(env_prefix="SAFETRAIN_", env_file=".env", extra="ignore")

    data_dir: Path = Field(default=Path("./var"), description="Database, uploads, artifacts and job folders.")
    models_dir: Path = Field(default=Path("./models"), description="Base models, one folder per model name.")
    database_url: str = Field(
        default="", description="SQLAlchemy URL; sqlite:///<data_dir>/safetrain.db when empty."
    )
    broker_url: str = Field(
        default="", description="Celery broker URL; kombu's SQLAlchemy transport on <data_dir>/broker.db when empty."
    )
    max_upload_bytes: int = Field(default=2 * 1024**3, gt=0, description="Largest accepted upload (413 above).")
    max_line_bytes: int = Field(default=4 * 1024**2, gt=0, description="Longest accepted dataset line.")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed by CORS (comma-separated or a JSON list)."
    )
    heartbeat_seconds: int = Field(default=10, gt=0, description="How often a running job's worker writes a heartbeat.")
    heartbeat_expiry_seconds: int = Field(default=60, gt=0, description="A running job silent this long is requeued.")
    visibility_timeout_seconds: int = Field(
        default=3600, gt=0, description="Broker redelivery timeout; longer than the heartbeat expiry."
    )
    max_attempts: int = Field(default=3, ge=1, description="Attempts a job gets before it fails for good.")
    allow_hub_models: bool = Field(default=False, description="Let a job's model name a Hugging Face Hub id.")
    max_concurrent_jobs: int = Field(default=4, ge=1, description="Default per-project cap on unfinished jobs.")
    max_stored_bytes: int = Field(
        default=50 * 1024**3, ge=1, description="Default per-project cap on stored file bytes."
    )
    inference_url: str = Field(
        default="", description="The engine /v1/chat/completions proxies to (vLLM in production); the embedded one "
        "on 127.0.0.1:<inference_port> when empty."
    )
    inference_port: int = Field(default=8001, gt=0, lt=65536, description="Port of `safetrain serve`.")
    inference_device: str = Field(default="auto", description="Where the embedded engine runs: auto, cpu, cuda:N.")
    inference_max_tokens: int = Field(default=1024, ge=1, description="Largest max_tokens a request may ask for.")
    inference_max_n: int = Field(default=8, ge=1, description="Most choices (n) a request may ask for.")
    inference_queue_size: int = Field(
        default=8, ge=1, description="Requests the embedded engine holds (running or waiting); 429 past it."
    )
    inference_adapter_cache: int = Field(default=8, ge=1, description="Adapters the embedded engine keeps loaded.")
    inference_timeout_seconds: float = Field(
        default=600.0, gt=0, description="How long the API waits on the engine for one answer."
    )
    environment: Literal["development", "production"] = Field(
        default="development", description="production refuses defaults."
    )
    secret_key: str = Field(default=DEFAULT_SECRET_KEY, description="Server secret; must be set in production.")

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.environment == "production" and self.secret_key == DEFAULT_SECRET_KEY:
            raise ValueError("SAFETRAIN_SECRET_KEY must be set to a non-default value in production")
        if self.visibility_timeout_seconds <= self.heartbeat_expiry_seconds:
            raise ValueError("SAFETRAIN_VISIBILITY_TIMEOUT_SECONDS must exceed SAFETRAIN_HEARTBEAT_EXPIRY_SECONDS")
        # The embedded default: everything under data_dir, no server needed.
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'safetrain.db').resolve()}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"
        return self

    @property
    def resolved_database_url(self) -> str:
        """The database URL (the SQLite default already filled in)."""
        return self.database_url

    @property
    def resolved_broker_url(self) -> str:
        """The broker URL (the embedded default already filled in)."""
        return self.broker_url

    @property
    def resolved_inference_url(self) -> str:
        """The engine's base URL (no trailing /v1): SAFETRAIN_INFERENCE_URL, else the embedded engine."""
        return (self.inference_url or f"http://127.0.0.1:{self.inference_port}").rstrip("/").removesuffix("/v1")

    @property
    def files_dir(self) -> Path:
        """Where uploads and result files live."""
        return self.data_dir / "files"

    @property
    def artifacts_dir(self) -> Path:
        """Where adapters and other job outputs are stored."""
        return self.data_dir / "artifacts"

    @property
    def jobs_dir(self) -> Path:
        """Where each job's work folder (checkpoints, telemetry) lives."""
        return self.data_dir / "jobs"

    def job_dir(self, job_id: str) -> Path:
        """The work folder of one job."""
        return self.jobs_dir / job_id


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's Settings, built once."""
    return Settings()
