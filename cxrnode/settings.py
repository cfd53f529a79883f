"""One settings object for the whole node.

Every option has a default, a description and an environment variable (prefix ``CXRNODE_``).
Options may also come from a TOML file named by ``CXRNODE_CONFIG``; the environment wins
over the file. ``config/cxrnode.example.toml`` is generated from this class
(``cxrnode config example``) and a test keeps the two in sync.
"""

from __future__ import annotations

import os
import re
import socket
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


#: Settings that hold secrets: each is also read from the file named by CXRNODE_<NAME>_FILE
#: (Docker secrets, systemd credentials), masked by `config show` and never logged.
SECRET_SETTINGS = ("api_token", "ldap_bind_password", "database_url", "broker_url")


class SecretFileSource(PydanticBaseSettingsSource):
    """``CXRNODE_<NAME>_FILE=/run/secrets/x`` for every secret setting: the file's content
    (one trailing newline dropped). The plain variable, when also set, is an error: two
    sources for one secret hide which one is in effect."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads every secret at once

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name in SECRET_SETTINGS:
            variable = f"{ENV_PREFIX}{name.upper()}_FILE"
            path = os.environ.get(variable)
            if not path:
                continue
            if os.environ.get(f"{ENV_PREFIX}{name.upper()}"):
                raise ValueError(
                    f"both {ENV_PREFIX}{name.upper()} and {variable} are set; keep one"
                )
            try:
                text = Path(path).read_text()
            except OSError as exc:
                raise ValueError(
                    f"{variable} names {path}, which cannot be read ({exc.strerror}); point it "
                    "at the secret's file (e.g. /run/secrets/...)"
                ) from None
            values[name] = text[:-1] if text.endswith("\n") else text
        return values


def masked(settings: Settings) -> dict[str, Any]:
    """The settings as JSON-ready values with every secret replaced by ``***`` (and the
    password inside a URL setting by ``***``): what `config show` prints."""
    data = settings.model_dump(mode="json")
    for name in SECRET_SETTINGS:
        value = data.get(name)
        if not value:
            continue
        if name.endswith("_url"):
            data[name] = re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", str(value))
        else:
            data[name] = "***"
    return data


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
            "Whole-PDU socket reads and a waiting DUL loop for pynetdicom "
            "(cxrnode.compat.pynetdicom); false runs stock pynetdicom. Turned off by itself "
            "when pynetdicom is not a tested release."
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
    # --- high availability (docs/operations.md, "High availability") ---------------------
    broker_sentinel_master: str | None = Field(
        None,
        description=(
            "Redis Sentinel: the monitored master's name, with BROKER_URL listing the "
            "Sentinels as sentinel://h1:26379;sentinel://h2:26379;sentinel://h3:26379. The "
            "workers and the node follow the master the Sentinels elect."
        ),
    )
    node_host: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description=(
            "This node host's name (default: the machine's host name). Two active node hosts "
            "sharing the database and broker each need their own: it is recorded on every "
            "instance this host stores and on every job, and the steps that read or write "
            "DATA_DIR (prepare, outputs, send) go to this host's queues (prepare.<NODE_HOST>, "
            "...), which its node-side worker consumes."
        ),
    )
    destination_probe_seconds: float = Field(
        10.0,
        ge=0,
        description=(
            "While outputs wait for a destination after a failed try, check it this often "
            "(C-ECHO, or an HTTP request for STOW-RS) and send as soon as it answers; "
            "0: only the retry backoff."
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

    # --- receive first: worker priority and prepare concurrency --------------------------------
    worker_niceness: int = Field(
        10,
        ge=0,
        le=19,
        description=(
            "Nice increment of the worker processes (`cxrnode worker`, and those `serve` "
            "starts): background work yields the CPU to the DICOM listeners, so a burst is "
            "acknowledged at the speed of the receive path. 0: the listeners' priority."
        ),
    )
    prepare_concurrency: int = Field(
        1,
        ge=1,
        description=(
            "Images one worker process decodes at once in the prepare step (the most "
            "CPU-hungry background work); its other tasks run beside them."
        ),
    )
    receive_hold_seconds: float = Field(
        1.0,
        ge=0,
        description=(
            "While instances keep arriving (any study), settled studies wait until none has "
            "arrived for this long before their work starts, so a burst is received first. "
            "0: off."
        ),
    )
    receive_hold_max_seconds: float = Field(
        30.0,
        ge=0,
        description="Longest a study waits for a burst to end (a stream never starves work).",
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

    # --- triage, notifications and self-consistency ------------------------------------------
    triage_priorities: str = Field(
        "pneumothorax=stat,pleural_effusion=asap,consolidation=asap",
        description=(
            "Which findings, when the draft codes them present, raise the study's priority: "
            "comma-separated finding=stat|asap pairs (findings not listed stay routine); "
            "'off' turns triage off. A draft never lowers the priority its order carries."
        ),
    )
    webhook_urls: CommaList = Field(
        default_factory=list,
        description=(
            "Comma-separated http(s) URLs that get a JSON POST for every urgent draft "
            "(X-Cxrnode-Signature: sha256=HMAC of the body with WEBHOOK_SECRET); empty: none."
        ),
    )
    webhook_secret: SecretStr | None = Field(
        None, description="HMAC-SHA256 key of the webhook signature (None: unsigned)."
    )
    smtp_host: str | None = Field(
        None, description="SMTP server for urgent-draft e-mails (None: no e-mail)."
    )
    smtp_port: int = Field(587, ge=1, le=65535, description="SMTP port (submission).")
    smtp_starttls: bool = Field(
        True, description="Upgrade the SMTP connection with STARTTLS before sending (required)."
    )
    smtp_tls_ca: Path | None = Field(
        None, description="PEM CA bundle that verifies the SMTP server (None: system CAs)."
    )
    smtp_user: str | None = Field(None, description="SMTP login user (None: no login).")
    smtp_password: SecretStr | None = Field(None, description="SMTP login password.")
    smtp_from: str = Field("cxrnode@localhost", description="From address of the e-mails.")
    smtp_to: CommaList = Field(
        default_factory=list, description="Comma-separated recipients of urgent-draft e-mails."
    )
    notify_max_attempts: int = Field(
        10, ge=1, description="Tries of one notification before it is recorded as failed."
    )
    consensus_samples: int = Field(
        1,
        ge=1,
        le=16,
        description=(
            "Reports sampled per study in one batched decode (shared image and prompt); "
            "findings are voted across them. 1: a single report, as before."
        ),
    )
    consensus_min_agreement: float = Field(
        0.0,
        ge=0,
        le=1,
        description=(
            "Least fraction of the samples that must agree on a finding's state; below it "
            "the finding is coded Undetermined (0: the majority always stands)."
        ),
    )

    # --- model at full size (loading precision, quantization) ---------------------------------
    model_dtype: Literal["auto", "bfloat16", "float32", "float16"] = Field(
        "auto",
        description=(
            "Precision of the loaded weights. auto: bf16 (or fp16) on a GPU; on the CPU fp32 "
            "when its copy takes at most half the memory available, else bf16 (the published "
            "7 B model: 14 GB in bf16, 28 GB in fp32)."
        ),
    )
    quantize: Literal["none", "int8", "int4"] = Field(
        "none",
        description=(
            "Weight-only quantization of the LLaMA layers (needs the quant extra, torchao): "
            "int8 halves their memory (CPU-only sites, 16 GB GPUs); int4 is for GPUs."
        ),
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

    # --- security: users, directory, web hardening, audit (docs/security.md) -----------------
    session_idle_minutes: float = Field(
        30.0,
        gt=0,
        description="Minutes without a request after which a dashboard session ends.",
    )
    login_max_failures: int = Field(
        5,
        ge=1,
        description=(
            "Failed dashboard logins for one name (or from one address) within "
            "LOGIN_LOCKOUT_MINUTES after which further tries are refused (a Security Alert)."
        ),
    )
    login_lockout_minutes: float = Field(
        15.0, gt=0, description="Minutes a locked-out name or address waits."
    )
    http_tls_cert: Path | None = Field(
        None,
        description=(
            "PEM certificate (chain) for the admin web app's own HTTPS (sites without a "
            "reverse proxy); needs HTTP_TLS_KEY. HSTS is then sent."
        ),
    )
    http_tls_key: Path | None = Field(None, description="PEM private key for HTTP_TLS_CERT.")
    ldap_url: str | None = Field(
        None,
        description=(
            "Directory for dashboard logins: ldaps://host:636 or ldap://host:389 (then "
            "StartTLS, see LDAP_START_TLS). Unset: local accounts only."
        ),
    )
    ldap_start_tls: bool = Field(
        True, description="Upgrade an ldap:// connection with StartTLS before any bind."
    )
    ldap_ca_file: Path | None = Field(
        None, description="PEM CA bundle that signed the directory's certificate."
    )
    ldap_user_dn: str | None = Field(
        None,
        description=(
            "Bind as the user: a DN template with {user}, e.g. "
            "uid={user},ou=people,dc=example,dc=org. Unset: search-then-bind with LDAP_BIND_DN."
        ),
    )
    ldap_bind_dn: str | None = Field(
        None, description="Service account that searches for the user (search-then-bind)."
    )
    ldap_bind_password: SecretStr | None = Field(
        None, description="Password of LDAP_BIND_DN (or CXRNODE_LDAP_BIND_PASSWORD_FILE)."
    )
    ldap_user_base: str = Field("", description="Where users are searched (search-then-bind).")
    ldap_user_filter: str = Field(
        "(|(uid={user})(sAMAccountName={user}))",
        description="Filter finding the user's entry; {user} is the escaped login name.",
    )
    ldap_group_base: str = Field("", description="Where groups are searched.")
    ldap_group_filter: str = Field(
        "(|(member={dn})(uniqueMember={dn}))",
        description="Filter finding the groups of the user entry {dn}.",
    )
    ldap_admin_groups: CommaList = Field(
        default_factory=list,
        description="Group DNs whose members are admins (semicolon-separated: DNs hold commas).",
    )
    ldap_operator_groups: CommaList = Field(
        default_factory=list, description="Group DNs whose members are operators."
    )
    ldap_viewer_groups: CommaList = Field(
        default_factory=list,
        description="Group DNs whose members are viewers. A user in none of the groups is refused.",
    )
    audit_syslog: str | None = Field(
        None,
        description=(
            "The site's audit repository, tls://host:6514 (RFC 5425 syslog over TLS). Records "
            "always go to DATA_DIR/audit/ first and are forwarded from there."
        ),
    )
    audit_syslog_ca: Path | None = Field(
        None, description="PEM CA bundle that signed the audit repository's certificate."
    )
    audit_syslog_cert: Path | None = Field(
        None, description="PEM client certificate for the audit repository (mutual TLS)."
    )
    audit_syslog_key: Path | None = Field(None, description="PEM key of AUDIT_SYSLOG_CERT.")
    audit_file_max_mb: int = Field(
        64, ge=1, description="Size in MiB at which an audit file is closed and a new one begun."
    )
    audit_site: str = Field(
        "", description="AuditEnterpriseSiteID of the audit messages (the site's name)."
    )

    @field_validator(
        "ldap_admin_groups", "ldap_operator_groups", "ldap_viewer_groups", mode="before"
    )
    @classmethod
    def _groups_comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(";") if item.strip()]
        return value

    @model_validator(mode="after")
    def _security_pairs(self) -> Settings:
        if bool(self.http_tls_cert) != bool(self.http_tls_key):
            raise ValueError("HTTP_TLS_CERT and HTTP_TLS_KEY go together: set both or neither")
        if self.audit_syslog and not self.audit_syslog.startswith("tls://"):
            raise ValueError(
                f"AUDIT_SYSLOG {self.audit_syslog!r}: expected tls://host:port (RFC 5425); "
                "audit records do not travel in clear"
            )
        return self

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

    @field_validator("triage_priorities")
    @classmethod
    def _valid_triage(cls, value: str) -> str:
        from cxrnode.triage import parse_priority_table

        parse_priority_table(value)
        return value

    @field_validator("webhook_urls", "smtp_to", mode="before")
    @classmethod
    def _notify_comma_separated(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("webhook_urls")
    @classmethod
    def _valid_webhooks(cls, value: list[str]) -> list[str]:
        for url in value:
            if not url.startswith(("http://", "https://")):
                raise ValueError(
                    f"WEBHOOK_URLS entry {url!r} is not an http(s):// URL; give full URLs, "
                    "comma-separated"
                )
        return value

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
        sources: list[PydanticBaseSettingsSource] = [
            init_settings,
            env_settings,
            SecretFileSource(settings_cls),
        ]
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


class _Computed(str):
    """A default computed at start-up, shown in the example as what it is computed from."""


_COMPUTED = {
    "data_dir": _Computed('"~/.local/share/cxrnode"  # $XDG_DATA_HOME/cxrnode'),
    "node_host": _Computed('""  # the machine\'s host name'),
}


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
            default = _COMPUTED.get(name) or field.default_factory()
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
    if isinstance(value, _Computed):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
