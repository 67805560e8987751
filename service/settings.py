"""The service's settings: one object read from the environment (prefix ``HDET_``), checked once.
Secrets (the API tokens, Ray's token) have no default and never appear in a repr, a log or a response.

``MLFLOW_TRACKING_URI`` and ``HDET_HOME`` are read under the names the workers use; Ray's token
under Ray's own names (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``).
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from workers.resources import parse_node_types

__all__ = ["Settings", "SettingsError", "MIN_TOKEN_LENGTH", "is_loopback"]

#: every API token must be at least this long, on loopback too.
MIN_TOKEN_LENGTH = 32


class SettingsError(ValueError):
    """The service cannot start with these settings; the message says which and what to do."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (``127.0.0.0/8``, ``::1``, ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Everything the API process needs; ``hdet serve`` fills in what it started itself."""

    model_config = SettingsConfigDict(env_prefix="HDET_", extra="ignore", populate_by_name=True)

    api_host: str = Field(default="127.0.0.1", description="bind address of the API")
    api_port: int = Field(default=8000, ge=0, le=65535, description="port of the API")
    api_token: SecretStr | None = Field(
        default=None, description="bearer token(s) of the API, comma-separated (several during a rotation)"
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the records (default: SQLite $HDET_HOME/service.db)"
    )
    ray_address: str | None = Field(
        default=None, description="Ray Jobs API (dashboard) URL, http://host:8265"
    )
    ray_auth_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("RAY_AUTH_TOKEN", "ray_auth_token")
    )
    ray_auth_token_path: str | None = Field(
        default=None, validation_alias=AliasChoices("RAY_AUTH_TOKEN_PATH", "ray_auth_token_path")
    )
    cluster_node_types: Annotated[list[dict[str, float]] | None, NoDecode] = Field(
        default=None,
        description=(
            'node types an autoscaling cluster can start, JSON: [{"CPU": 8, "GPU": 1, '
            '"accelerator_type:A100": 1}]; a spec no type can hold is refused (default: the nodes Ray reports)'
        ),
    )
    ray_timeout_s: float = Field(default=10.0, gt=0, description="timeout of one Jobs API request")
    mlflow_tracking_uri: str | None = Field(
        default=None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "mlflow_tracking_uri")
    )
    mlflow_ui_url: str | None = Field(default=None, description="base URL of the MLflow UI for links")
    home: str | None = Field(default=None, validation_alias=AliasChoices("HDET_HOME", "home"))
    data_roots: str | None = Field(
        default=None,
        description=(
            "folders, separated by ':', that the paths of a submitted spec must lie under "
            "(default: $HDET_HOME/data); as the cluster's jobs see them"
        ),
    )
    entrypoint_python: str | None = Field(
        default=None, description="interpreter of the job on the cluster (default: this one)"
    )
    entrypoint_num_cpus: float | None = Field(default=None, ge=0)
    entrypoint_num_gpus: float | None = Field(default=None, ge=0)
    entrypoint_resources: dict[str, float] | None = Field(
        default=None, description='custom resources of the entrypoint, JSON: {"name": amount}'
    )
    storage_path: str | None = Field(default=None, description="Ray Train storage, passed as --storage-path")
    job_env: dict[str, str] | None = Field(
        default=None, description="environment variables of every job, JSON (hdet serve sets HDET_HOME)"
    )
    reconcile_interval_s: float = Field(default=2.0, gt=0)
    submit_concurrency: int = Field(
        default=8,
        ge=1,
        description="submissions validated and stored at once (Ray is asked behind the answer); the others "
        "wait their turn without holding a thread, so reads keep threads of their own",
    )
    submit_wait_s: float = Field(
        default=30.0,
        gt=0,
        description="how long a submission waits for its turn before a 503 with Retry-After",
    )
    max_active: int = Field(
        default=16,
        ge=1,
        description="experiments of this database kept in Ray at once (PENDING, RUNNING or CANCELLING); "
        "later ones wait SUBMITTING in the service's queue, oldest first, so that a burst of submissions "
        "is not a burst of Ray jobs",
    )
    service_name: str | None = Field(
        default=None, description="hdet.service metadata of its jobs (default: an id kept in the database)"
    )
    background: Literal["process", "thread"] = Field(
        default="process",
        description="where the reconciler and the submitter run: a process of their own, which requests "
        "never wait for (process), or threads of the API process (thread)",
    )

    @field_validator("cluster_node_types", mode="before")
    @classmethod
    def _node_types(cls, value: Any) -> Any:
        # the driver reads the same variable with the same parser (workers.resources)
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return parse_node_types(value) if isinstance(value, str | list) else value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        # Ray's client lets RAY_API_SERVER_ADDRESS, then RAY_ADDRESS, override the address it is
        # given: the service would talk to another cluster than the one it was told about.
        for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            other = os.environ.get(name)
            if other and other.rstrip("/") != (self.ray_address or "").rstrip("/"):
                raise SettingsError(
                    f"{name}={other!r} overrides the Ray address the service is given "
                    f"(HDET_RAY_ADDRESS={self.ray_address!r}); unset it or make them equal"
                )
        relative = [
            r for r in (self.data_roots or "").split(":") if r.strip() and not Path(r.strip()).is_absolute()
        ]
        if relative:
            raise SettingsError(f"HDET_DATA_ROOTS: {', '.join(relative)} is not an absolute path")
        short = [t for t in self.tokens() if len(t) < MIN_TOKEN_LENGTH]
        if short:
            raise SettingsError(
                f"every HDET_API_TOKEN must be at least {MIN_TOKEN_LENGTH} characters "
                "(`hdet serve` generates one when none is set)"
            )
        if not is_loopback(self.api_host) and not self.tokens():
            raise SettingsError(
                f"HDET_API_HOST={self.api_host} is reachable from other machines: set HDET_API_TOKEN "
                f"(at least {MIN_TOKEN_LENGTH} characters), or bind 127.0.0.1"
            )
        return self

    def tokens(self) -> list[str]:
        """The accepted API tokens (several while a token is rotated)."""
        if self.api_token is None:
            return []
        return [t.strip() for t in self.api_token.get_secret_value().split(",") if t.strip()]

    def home_dir(self) -> Path:
        """``$HDET_HOME`` as the workers resolve it."""
        if self.home:
            return Path(self.home).expanduser().resolve()
        from workers.env import hdet_home

        return hdet_home()

    def data_root_paths(self) -> list[Path]:
        """``HDET_DATA_ROOTS`` as absolute folders, else ``$HDET_HOME/data``."""
        given = [Path(r.strip()) for r in (self.data_roots or "").split(":") if r.strip()]
        return given or [self.home_dir() / "data"]

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home_dir() / 'service.db'}"

    def resolved_tracking_uri(self) -> str:
        """MLflow as the service and its jobs see it (the workers' default when unset)."""
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{self.home_dir() / 'mlflow' / 'mlflow.db'}"

    def ui_url(self) -> str | None:
        """Base of MLflow UI links: ``HDET_MLFLOW_UI_URL``, else an http tracking URI."""
        if self.mlflow_ui_url:
            return self.mlflow_ui_url.rstrip("/")
        uri = self.resolved_tracking_uri()
        return uri.rstrip("/") if uri.startswith(("http://", "https://")) else None

    def ray_token(self) -> str | None:
        """Ray's token for the Jobs API: ``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH``."""
        if self.ray_auth_token is not None:
            return self.ray_auth_token.get_secret_value().strip() or None
        if self.ray_auth_token_path:
            path = Path(self.ray_auth_token_path).expanduser()
            if not path.is_file():
                raise SettingsError(f"RAY_AUTH_TOKEN_PATH={path} does not exist")
            return path.read_text().strip() or None
        return None

    def require_ready(self) -> None:
        """What the API cannot start without: a token, and a Ray address."""
        if not self.tokens():
            raise SettingsError(
                "HDET_API_TOKEN is not set: the API refuses to start without a token "
                "(`hdet serve` generates one into $HDET_HOME/api-token)"
            )
        if not self.ray_address:
            raise SettingsError(
                "HDET_RAY_ADDRESS is not set (the Ray Jobs API URL, e.g. http://127.0.0.1:8265)"
            )

    def entrypoint_options(self) -> dict[str, Any]:
        """``submit_job`` keywords of the job's entrypoint resources."""
        out: dict[str, Any] = {}
        if self.entrypoint_num_cpus is not None:
            out["entrypoint_num_cpus"] = self.entrypoint_num_cpus
        if self.entrypoint_num_gpus is not None:
            out["entrypoint_num_gpus"] = self.entrypoint_num_gpus
        if self.entrypoint_resources:
            out["entrypoint_resources"] = dict(self.entrypoint_resources)
        return out
