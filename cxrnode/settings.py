"""One settings object for the whole node.

Every option has a default, a description and an environment variable (prefix ``CXRNODE_``).
Options may also come from a TOML file named by ``CXRNODE_CONFIG``; the environment wins
over the file. ``config/cxrnode.example.toml`` is generated from this class
(``cxrnode config example``) and a test keeps the two in sync.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from cxrnode.destination import Destination, DestinationKind
from cxrnode.destination import check_ae_title as _check_aet
from cxrnode.destination import parse_destination as parse_destination  # (re-exported)

ENV_PREFIX = "CXRNODE_"
CONFIG_ENV = "CXRNODE_CONFIG"

CommaList = Annotated[list[str], NoDecode]
DayList = Annotated[list[int], NoDecode]


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "cxrnode"


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Configuration of a cxrnode installation (node, workers and CLI share it)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", validate_default=True, populate_by_name=True
    )

    # --- identity and network -------------------------------------------------------------
    ae_title: str = Field("CXRNODE", description="Our AE title; callers must address it.")
    dicom_host: str = Field("0.0.0.0", description="Address the DICOM listener binds to.")
    dicom_port: int = Field(11112, ge=1, le=65535, description="DICOM (C-ECHO/C-STORE) port.")
    http_host: str = Field("127.0.0.1", description="Address the admin web app binds to.")
    http_port: int = Field(8080, ge=1, le=65535, description="Admin web app port.")
    require_called_aet: bool = Field(
        True, description="Refuse associations whose called AE title is not ours."
    )
    allowed_calling_aets: CommaList = Field(
        default_factory=list,
        description=(
            "Comma-separated allow-list of calling AE titles, each optionally pinned to a host "
            "as AET@host (IP address or name). Empty: any caller is accepted."
        ),
    )
    max_associations: int = Field(
        32, ge=1, description="Most concurrent associations the node accepts (all processes)."
    )
    scp_processes: int = Field(
        0,
        ge=0,
        description=(
            "DICOM listener processes sharing the port (SO_REUSEPORT). 0: one per CPU core, "
            "at most 4."
        ),
    )
    max_pdu_size: int = Field(
        4 * 1024 * 1024,
        ge=0,
        description="Largest P-DATA PDU we accept, in bytes (0 = unlimited).",
    )
    network_timeout: float = Field(
        60.0, gt=0, description="Seconds of silence before an association is aborted."
    )
    receive_tuning: bool = Field(
        True,
        description=(
            "Whole-PDU socket reads and a waiting DUL loop for pynetdicom (cxrnode.net.receive); "
            "false runs stock pynetdicom. Turned off by itself when pynetdicom is not a tested "
            "release."
        ),
    )

    # --- DICOM TLS ----------------------------------------------------------------------------
    tls_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Port of an extra DICOM TLS listener (2762 is usual); needs cert and key.",
    )
    tls_cert: Path | None = Field(None, description="PEM server certificate for DICOM TLS.")
    tls_key: Path | None = Field(None, description="PEM private key for DICOM TLS.")
    tls_client_ca: Path | None = Field(
        None, description="PEM CA bundle; when set, callers must present a certificate (mTLS)."
    )

    # --- storage and state --------------------------------------------------------------------
    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Where instances, outputs and the embedded database and broker live.",
    )
    database_url: str | None = Field(
        None,
        description=(
            "SQLAlchemy URL. Default: SQLite at DATA_DIR/cxrnode.db. PostgreSQL: "
            "postgresql+psycopg://user@host/db."
        ),
    )
    broker_url: str | None = Field(
        None,
        description=(
            "Celery broker (Redis). Default: an embedded redis-server that `serve` starts on a "
            "unix socket under DATA_DIR. Distributed: redis://host:6379/0."
        ),
    )
    duplicates: Literal["keep_first", "replace"] = Field(
        "keep_first",
        description="What to do when an SOP Instance UID arrives again: keep the first copy or replace it.",
    )
    min_free_disk_mb: int = Field(
        1024,
        ge=0,
        description=(
            "Free-space reserve of DATA_DIR in MiB. Below it C-STOREs get 0xA700 and new "
            "associations are refused until space returns."
        ),
    )

    # --- hardening and logs -------------------------------------------------------------------
    tls_only: bool = Field(
        False,
        description=(
            "Serve DICOM over TLS only: the plain DICOM_PORT is not opened. Needs TLS_PORT, "
            "TLS_CERT and TLS_KEY."
        ),
    )
    max_image_mb: int = Field(
        256,
        ge=1,
        description=(
            "Largest decoded image frame (Rows x Columns x samples x bytes) the node prepares, "
            "in MiB. A larger image is stored, answered 0x0000 and recorded as skipped; "
            "preparing one takes at most about 2x this in memory (docs/hardening.md)."
        ),
    )
    log_targets: CommaList = Field(
        default_factory=lambda: ["stderr", "file"],
        description=(
            "Where the node's long-running processes log, comma-separated: stderr, file "
            "(rotating files DATA_DIR/logs/<process>.log). Short CLI commands log to stderr."
        ),
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="Log line format: text, or json (one JSON object a line)."
    )
    log_file_max_mb: int = Field(
        20, ge=1, description="Size in MiB at which a log file is rotated."
    )
    log_file_backups: int = Field(5, ge=0, description="Rotated log files kept per process.")

    @field_validator("log_targets", mode="before")
    @classmethod
    def _log_targets_comma_separated(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("log_targets")
    @classmethod
    def _valid_log_targets(cls, value: list[str]) -> list[str]:
        targets = [entry.strip().lower() for entry in value]
        wrong = [entry for entry in targets if entry not in ("stderr", "file")]
        if wrong or not targets:
            raise ValueError(
                f"LOG_TARGETS {value} names no or unknown targets; expected stderr, file or "
                "both (comma-separated)"
            )
        return list(dict.fromkeys(targets))

    @model_validator(mode="after")
    def _tls_only_needs_tls(self) -> Settings:
        if self.tls_only and not (self.tls_port and self.tls_cert and self.tls_key):
            raise ValueError(
                "TLS_ONLY closes the plain DICOM port, so it needs TLS_PORT, TLS_CERT and "
                "TLS_KEY; set them or turn TLS_ONLY off"
            )
        return self

    # --- study grouping and jobs --------------------------------------------------------------
    settle_seconds: float = Field(
        5.0, ge=0, description="Quiet period after the last arrival before a study is processed."
    )
    job_deadline_seconds: float = Field(
        1800.0,
        gt=0,
        description=(
            "Hard limit on one step of a job, even while a live worker holds it (a hung "
            "worker); lost work is found sooner, from worker heartbeats."
        ),
    )
    reconcile_interval: float = Field(
        15.0,
        gt=0,
        description=(
            "Seconds between two searches for lost work (a dead worker's jobs are re-sent "
            "within about this plus 30 s)."
        ),
    )

    # --- model ---------------------------------------------------------------------------------
    model: str | None = Field(
        None, description="Directory or hub id of a CXR-LLaVA v2 checkpoint (None: not loaded)."
    )
    device: str | None = Field(
        None, description="torch device for inference; None picks cuda if present."
    )
    temperature: float = Field(0.2, ge=0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(0.8, gt=0, le=1, description="Nucleus sampling threshold.")
    max_new_tokens: int = Field(512, ge=1, le=512, description="Most tokens generated per answer.")
    batch_size: int = Field(
        8,
        ge=1,
        description=(
            "Studies an inference worker decodes together (KV-cache slots); a finished "
            "study's slot takes the next waiting one between two decode steps."
        ),
    )
    exact_resize: bool = Field(
        False,
        description=(
            "Prepare the model input with a full-resolution LANCZOS resize (the reference's "
            "PNG path, about 2x slower) instead of reducing first (mean difference < 0.3 "
            "grey levels)."
        ),
    )
    model_retry_seconds: float = Field(
        30.0,
        gt=0,
        description="While no model can be loaded, seconds between retries of a waiting job.",
    )

    # --- outputs ------------------------------------------------------------------------------
    outputs: CommaList = Field(
        default_factory=lambda: ["text_sr", "sc"],
        description=(
            "Comma-separated objects made for each draft, in any order: text_sr (text-report "
            "SR, what viewers show as text), sc (Secondary Capture: the radiograph with the "
            "draft beside it), air_sr (TID 1500 SR per IHE AI Results, for machines: OHIF "
            "shows an error for it), pdf (Encapsulated PDF). See docs/outputs.md."
        ),
    )
    destinations: CommaList = Field(
        default_factory=list,
        description=(
            "Comma-separated destinations for the SR and SC: AET@host:port (DICOM), "
            "dicom-tls://AET@host:port (DICOM TLS) or an http(s):// DICOMweb base URL "
            "(STOW-RS); empty: none."
        ),
    )
    send_retry_base_seconds: float = Field(
        30.0, gt=0, description="Delay before retrying a failed send; doubles with every try."
    )
    send_retry_max_seconds: float = Field(
        600.0, gt=0, description="Longest delay between two tries of a send."
    )
    send_max_attempts: int = Field(
        10, ge=1, description="Tries before an output becomes a dead letter (`cxrnode resend`)."
    )
    send_timeout: float = Field(
        30.0,
        gt=0,
        description=(
            "Seconds to wait for a destination to connect, accept or answer; a claimed output "
            "is re-sent after 10x this if its task is lost."
        ),
    )
    send_tls_ca: Path | None = Field(
        None,
        description="PEM CA bundle for dicom-tls:// and https:// destinations (None: system CAs).",
    )
    send_tls_cert: Path | None = Field(
        None, description="PEM client certificate offered to destinations (mutual TLS)."
    )
    send_tls_key: Path | None = Field(None, description="PEM private key of SEND_TLS_CERT.")
    institution_name: str | None = Field(
        None, description="Institution Name written into the SR and SC (None: left out)."
    )

    # --- HL7 and monitoring -------------------------------------------------------------------
    hl7_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description=(
            "Port of the MLLP listener that takes radiologists' final reports as HL7 v2 ORU^R01 "
            "(2575 is usual); None: off. Final reports also arrive as SR by C-STORE."
        ),
    )
    hl7_host: str = Field("0.0.0.0", description="Address the MLLP listener binds to.")
    hl7_destinations: CommaList = Field(
        default_factory=list,
        description=(
            "Comma-separated MLLP destinations (mllp://host:port) that receive each AI draft as "
            "an HL7 v2.5.1 ORU^R01 with result status P (preliminary); empty: none."
        ),
    )
    hl7_sending_application: str = Field(
        "CXRNODE", description="MSH-3 of the ORU drafts and of our ACKs."
    )
    hl7_sending_facility: str = Field("", description="MSH-4 of the ORU drafts and of our ACKs.")
    hl7_receiving_application: str = Field("", description="MSH-5 of the ORU drafts.")
    hl7_receiving_facility: str = Field("", description="MSH-6 of the ORU drafts.")
    hl7_accession_fields: CommaList = Field(
        default_factory=lambda: ["OBR-3", "OBR-18"],
        description=(
            "Where an incoming ORU carries the accession number, first non-empty wins (OBR-2, "
            "OBR-3, OBR-18, OBR-19, OBR-20 or ORC-2, ORC-3); the first component is used. Our "
            "own drafts carry it in OBR-3."
        ),
    )
    hl7_max_message_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description=(
            "Largest HL7 message the MLLP listener accepts, in bytes; a larger one is read to "
            "its end, its first bytes kept, recorded and answered AR."
        ),
    )
    monitor_windows_days: DayList = Field(
        default_factory=lambda: [7, 30],
        description=(
            "Rolling windows, in days, over which AI-radiologist agreement is computed "
            "(all time is always added)."
        ),
    )
    monitor_interval_seconds: float = Field(
        60.0,
        gt=0,
        description=(
            "Seconds between two looks for reports to match and drafts to re-score (a report "
            "is scored at once when its draft exists; this catches drafts made after it)."
        ),
    )
    agreement_f1_floor: float = Field(
        0.4,
        ge=0,
        le=1,
        description=(
            "The alert fires when a finding's F1 over a rolling window falls below this "
            "(exported as cxrnode_agreement_f1_floor for the Prometheus rule)."
        ),
    )
    agreement_kappa_floor: float = Field(
        0.3,
        ge=-1,
        le=1,
        description="The same for Cohen's kappa (cxrnode_agreement_kappa_floor).",
    )
    agreement_min_pairs: int = Field(
        30,
        ge=1,
        description=(
            "Fewest definite AI-radiologist pairs a finding needs in a window before the alert "
            "may fire (cxrnode_agreement_min_pairs)."
        ),
    )

    @field_validator("hl7_destinations", "hl7_accession_fields", mode="before")
    @classmethod
    def _hl7_comma_separated(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("monitor_windows_days", mode="before")
    @classmethod
    def _days_comma_separated(cls, value: Any) -> Any:
        if isinstance(value, int):
            return [value]
        return _split_commas(value)

    @field_validator("monitor_windows_days")
    @classmethod
    def _valid_windows(cls, value: list[int]) -> list[int]:
        if any(days < 1 for days in value):
            raise ValueError(f"MONITOR_WINDOWS_DAYS must be whole days >= 1; got {value}")
        return sorted(set(value))

    @field_validator("hl7_destinations")
    @classmethod
    def _valid_hl7_destinations(cls, value: list[str]) -> list[str]:
        for entry in value:
            if Destination.parse(entry).kind != DestinationKind.mllp:
                raise ValueError(
                    f"HL7_DESTINATIONS entry {entry!r} is not an MLLP address; expected "
                    "mllp://host:port (DICOM and DICOMweb destinations go in DESTINATIONS)"
                )
        return value

    @field_validator("hl7_accession_fields")
    @classmethod
    def _valid_accession_fields(cls, value: list[str]) -> list[str]:
        allowed = ("OBR-2", "OBR-3", "OBR-18", "OBR-19", "OBR-20", "ORC-2", "ORC-3")
        fields = [entry.upper() for entry in value]
        wrong = [entry for entry in fields if entry not in allowed]
        if wrong or not fields:
            raise ValueError(
                f"HL7_ACCESSION_FIELDS {value} names no or unknown fields; choose from {allowed}"
            )
        return fields

    @model_validator(mode="after")
    def _no_mllp_in_dicom_destinations(self) -> Settings:
        mllp = [entry for entry in self.destinations if entry.strip().lower().startswith("mllp://")]
        if mllp:
            raise ValueError(
                f"DESTINATIONS {mllp} are MLLP addresses; HL7 drafts go to HL7_DESTINATIONS, "
                "DESTINATIONS takes DICOM and DICOMweb destinations only"
            )
        return self

    # --- admin --------------------------------------------------------------------------------
    api_token: SecretStr | None = Field(
        None,
        description=(
            "Bearer token for the admin API, the dashboard and every action (use 16 or more "
            "random characters). Unset: no authentication, which the web app allows only on a "
            "loopback HTTP_HOST (see HTTP_ALLOW_NO_TOKEN)."
        ),
    )
    http_allow_no_token: bool = Field(
        False,
        description=(
            "Let the web app listen on a non-loopback HTTP_HOST without API_TOKEN (behind a "
            "reverse proxy that authenticates): anyone who reaches the port can then act."
        ),
    )
    health_open: bool = Field(
        True,
        description="/healthz and /readyz answer without the token (compose, load balancers).",
    )
    metrics_open: bool = Field(
        True,
        description=(
            "/metrics answers without the token; false: Prometheus must send it "
            "(authorization: credentials in the scrape config)."
        ),
    )
    session_hours: float = Field(
        12.0, gt=0, description="Hours a dashboard login lasts before the token is asked again."
    )
    log_level: str = Field("INFO", description="Python logging level.")

    # --- retention ----------------------------------------------------------------------------
    retention_days: float = Field(
        30.0,
        ge=0,
        description=(
            "Days a study's files (received instances, prepared images, emitted objects) are "
            "kept after it is delivered: every output delivered or superseded, no job open, no "
            "dead letter. The database keeps its records (marked purged). 0 keeps everything."
        ),
    )
    retention_interval_seconds: float = Field(
        3600.0,
        gt=0,
        description="Seconds between two retention passes of `serve` (one cheap query when idle).",
    )
    allow_root: bool = Field(
        False,
        description=(
            "Acknowledge running as root (bare metal): the workers then say nothing about it. "
            "Better: run cxrnode as a dedicated user (the images do)."
        ),
    )

    # --- validation ---------------------------------------------------------------------------
    @field_validator("allowed_calling_aets", "destinations", "outputs", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("ae_title")
    @classmethod
    def _valid_ae_title(cls, value: str) -> str:
        return _check_aet(value, "AE_TITLE")

    @field_validator("allowed_calling_aets")
    @classmethod
    def _valid_callers(cls, value: list[str]) -> list[str]:
        for entry in value:
            _check_aet(entry.split("@", 1)[0], "ALLOWED_CALLING_AETS entry")
        return value

    @field_validator("outputs")
    @classmethod
    def _valid_outputs(cls, value: list[str]) -> list[str]:
        from cxrnode.uids import OutputKind

        kinds = [kind.value for kind in OutputKind]
        chosen = list(dict.fromkeys(entry.strip().lower() for entry in value))
        unknown = [entry for entry in chosen if entry not in kinds]
        if unknown or not chosen:
            found = f"unknown {unknown}" if unknown else "nothing"
            raise ValueError(
                f"OUTPUTS lists the objects to make for each draft; found {found}. Expected a "
                f"comma-separated list of {', '.join(kinds)} (the default is text_sr,sc)"
            )
        return chosen

    @field_validator("destinations")
    @classmethod
    def _valid_destinations(cls, value: list[str]) -> list[str]:
        for entry in value:
            Destination.parse(entry)
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_ENV)
        if config_file:
            path = Path(config_file)
            if not path.is_file():
                raise FileNotFoundError(
                    f"{CONFIG_ENV} names {path}, which is not a file; point it at a TOML file "
                    "such as config/cxrnode.example.toml or unset it"
                )
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    # --- derived values -------------------------------------------------------------------------
    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'cxrnode.db'}"

    @property
    def effective_scp_processes(self) -> int:
        return self.scp_processes or max(1, min(4, os.cpu_count() or 1))

    @property
    def instances_dir(self) -> Path:
        return self.data_dir / "instances"

    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"

    @property
    def prepared_dir(self) -> Path:
        """Display images and model inputs kept by the prepare step."""
        return self.data_dir / "prepared"

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    def calling_aet_allowed(self, calling_aet: str, host: str) -> bool:
        """Whether a caller passes the allow-list (an empty list admits everyone)."""
        if not self.allowed_calling_aets:
            return True
        calling_aet = calling_aet.strip()
        for entry in self.allowed_calling_aets:
            aet, _, pinned_host = entry.partition("@")
            if aet.strip() == calling_aet and (not pinned_host or pinned_host == host):
                return True
        return False


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment and CXRNODE_CONFIG."""
    return Settings()


def example_toml() -> str:
    """Render every option with its description and default as a commented TOML file."""
    lines = [
        "# cxrnode settings. Every option is shown with its default.",
        f"# Point {CONFIG_ENV} at a copy of this file; {ENV_PREFIX}<NAME> environment variables win.",
        "# Generated by `cxrnode config example`; tests/node/test_settings.py keeps it in sync.",
        "",
    ]
    for name, field in Settings.model_fields.items():
        env = ENV_PREFIX + name.upper()
        lines.append(f"# {field.description} (env {env})")
        if field.default_factory is not None:
            default = "(computed)" if name == "data_dir" else field.default_factory()
        else:
            default = field.default
        lines.append(f"# {name} = {_toml_value(default)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if value is None:
        return '""  # unset'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if value == "(computed)":
        return '"~/.local/share/cxrnode"  # $XDG_DATA_HOME/cxrnode'
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
