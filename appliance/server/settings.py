"""The server's settings: one pydantic model feeds CLI flags, ``APPLIANCE_*`` variables and a file.

Precedence, highest first: command-line flags, environment (``APPLIANCE_MAX_QUEUE=8``), the
TOML file given with ``--config`` (top-level keys named like the fields), the defaults here.
``appliance serve`` builds its flags from :attr:`ServerSettings.model_fields`, so a new field is
a new flag, a new variable and a new config key at once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, cast, get_args, get_origin

import click
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from appliance.apikeys import key_file
from appliance.canary import Thresholds
from appliance.runtime.base import RuntimeSettings
from appliance.server.requestlog import parse_sinks
from signing.errors import InputError

REQUEST_LOG: Final = "requests.jsonl"
F = TypeVar("F", bound=Callable[..., Any])
# Requests generating at once is the runtime's ``parallel``: one default, defined there.
DEFAULT_PARALLEL: Final = cast(int, RuntimeSettings.__dataclass_fields__["parallel"].default)


class ServerSettings(BaseSettings):
    """Limits and switches of ``appliance serve``."""

    model_config = SettingsConfigDict(env_prefix="APPLIANCE_", extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8080, ge=0, le=65535, description="TCP port (0: any free port).")
    max_concurrency: int | None = Field(
        None,
        ge=1,
        description=f"Requests generating at once (default: {DEFAULT_PARALLEL}, the runtime's).",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="llama.cpp threads (default: the recipe's runtime.threads, else half the "
        "CPUs serve may use): fewer than the cores degrades gracefully on a shared host.",
    )
    max_queue: int = Field(
        16, ge=0, description="Requests waiting for a free slot; beyond that: 429."
    )
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1, description="Largest request body: 413.")
    request_timeout_s: float = Field(
        600.0, gt=0, description="Per-request limit, queueing included: 504."
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Time a connection has to send a whole request head, from opening and "
        "after each response; then it is closed.",
    )
    max_connections: int | None = Field(
        None,
        ge=1,
        description="Open connections at most; one more closes the one longest waiting for a "
        "request head (default: what the open-file limit allows).",
    )
    log_prompts: bool = Field(False, description="Write prompt text into the request log.")
    request_log: Path | None = Field(
        None, description=f"JSON-lines request log (default: ROOT/{REQUEST_LOG})."
    )
    request_log_sinks: str = Field(
        "file",
        description="Where request records go, comma-separated: file, stdout, syslog "
        "(each gets the same hash-chained, masked record).",
    )
    request_log_max_bytes: int = Field(
        64 * 1024 * 1024,
        ge=4096,
        description="Rotate the request log at this size; the new file anchors to the old.",
    )
    syslog_socket: Path = Field(
        Path("/dev/log"), description="The syslog (or journald) socket of the syslog sink."
    )
    masking: Literal["off", "log", "model", "both"] = Field(
        "log",
        description="PII masking: of the prompt text logged with log_prompts (log), of "
        "prompts before they reach the model (model), both, or off.",
    )
    masking_keys: dict[str, Literal["off", "log", "model", "both"]] = Field(
        default_factory=dict,
        description="PII masking per API key name, over 'masking': NAME=POLICY,... (a table "
        "in the config file, JSON in the environment).",
    )
    api_key_file: Path | None = Field(
        None, description="API key file (default: ROOT/api-keys.json)."
    )
    public_docs: bool = Field(
        False, description="Serve /docs and /openapi.json without an API key."
    )
    tls_cert: Path | None = Field(
        None, description="Serve HTTPS with this PEM certificate (chain) file."
    )
    tls_key: Path | None = Field(
        None, description="The certificate's unencrypted PEM private key (default: in tls_cert)."
    )
    tls_min_version: Literal["1.2", "1.3"] | None = Field(
        None, description="Oldest TLS version accepted (default: 1.2)."
    )
    canary_max_error_rate: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Abort a canary whose share of 5xx answers, over its last 200 requests, "
        "is above this ('canary start --max-error-rate' overrides it).",
    )
    canary_max_p99_ms: int | None = Field(
        None,
        ge=1,
        description="Abort a canary whose p99 request latency (ms) is above this (default: "
        "not checked; 'canary start --max-p99-ms' overrides it).",
    )
    canary_min_requests: int = Field(
        20,
        ge=1,
        le=200,
        description="Canary requests seen before its thresholds are judged.",
    )
    canary_max_eval_mismatch: float | None = Field(
        0.05,
        ge=0,
        le=1,
        description="Abort a canary whose bundle carries an evaluation set when the share of "
        "its items the active model answers right and the canary does not is above this.",
    )

    @field_validator("masking_keys", mode="before")
    @classmethod
    def _pairs(cls, value: Any) -> Any:
        """``alice=both,bob=off`` (the flag's form) as a mapping."""
        if not isinstance(value, str):
            return value
        pairs = [p.strip() for p in value.split(",") if p.strip()]
        if any("=" not in p for p in pairs):
            raise ValueError("expected NAME=POLICY pairs separated by commas")
        return dict(p.split("=", 1) for p in pairs)

    @model_validator(mode="after")
    def _text_only_masked(self) -> ServerSettings:
        parse_sinks(self.request_log_sinks)
        if self.log_prompts:
            for name, policy in [("masking", self.masking), *self.masking_keys.items()]:
                if policy not in ("log", "both"):
                    where = "masking" if name == "masking" else f"masking_keys.{name}"
                    raise ValueError(
                        f"log_prompts needs {where} = 'log' or 'both': prompt text reaches "
                        "the request log only masked"
                    )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # No dotenv, no secrets directory: nothing is read that the operator did not name.
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)

    @classmethod
    def load(cls, *, config: Path | None = None, **overrides: Any) -> ServerSettings:
        """Settings from ``overrides`` (CLI flags; None means not given), env and ``config``."""
        given = {k: v for k, v in overrides.items() if v is not None}
        target: type[ServerSettings] = cls
        if config is not None:
            if not config.is_file():
                raise InputError(f"server config {config} does not exist")
            target = type(
                cls.__name__, (cls,), {"model_config": {**cls.model_config, "toml_file": config}}
            )
        try:
            return target(**given)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "settings"
            raise InputError(f"server setting {where}: {first['msg']}") from None
        except ValueError as exc:  # a TOML syntax error
            raise InputError(f"server config {config}: {exc}") from None

    def resolved(self, *, root: Path) -> ServerSettings:
        """Fill the defaults that depend on the host: where the key file and the log are."""
        return self.model_copy(
            update={
                "api_key_file": self.api_key_file or key_file(root),
                "request_log": self.request_log or root / REQUEST_LOG,
            }
        )

    @property
    def concurrency(self) -> int:
        """Requests generating at once, which is also the runtime's ``parallel``."""
        return self.max_concurrency or DEFAULT_PARALLEL

    def canary_thresholds(self) -> Thresholds:
        """The canary's abort thresholds where ``canary start`` set none (appliance.canary)."""
        return Thresholds(
            max_error_rate=self.canary_max_error_rate,
            max_p99_ms=self.canary_max_p99_ms,
            min_requests=self.canary_min_requests,
            max_eval_mismatch=self.canary_max_eval_mismatch,
        )


def settings_options(command: F) -> F:
    """Decorate a click command with one option per :class:`ServerSettings` field.

    Every option defaults to None (not given), so that the environment and the config file
    still apply beneath it; pass the values to :meth:`ServerSettings.load`.
    """
    for name, info in reversed(ServerSettings.model_fields.items()):
        flag = "--" + name.replace("_", "-")
        literal = get_origin(info.annotation) is Literal  # a plain Literal: one kind
        kinds = (info.annotation,) if literal else get_args(info.annotation) or (info.annotation,)
        kind = next(k for k in kinds if k is not type(None))
        help_text = f"{info.description} [env APPLIANCE_{name.upper()}]"
        if kind is bool:
            option = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)
        elif get_origin(kind) is dict:  # NAME=VALUE,NAME=VALUE (the field's validator parses it)
            option = click.option(flag, name, type=str, default=None, help=help_text)
        elif get_origin(kind) is Literal:
            choice = click.Choice(get_args(kind))
            option = click.option(flag, name, type=choice, default=None, help=help_text)
        else:
            click_type: Any = click.Path(path_type=Path) if kind is Path else kind
            option = click.option(flag, name, type=click_type, default=None, help=help_text)
        command = option(command)
    return command
