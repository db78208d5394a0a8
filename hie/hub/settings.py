"""One ``Settings`` object for the whole hub, read from ``HIE_*`` environment variables.

Built by :func:`load_settings` and passed down; nothing reads the environment at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_S3_SECRET = "hie-dev-secret"


class Settings(BaseSettings):
    """Every setting the hub reads. Each field is documented in the README's table."""

    model_config = SettingsConfigDict(env_prefix="HIE_", extra="ignore")

    env: Literal["development", "production"] = "development"
    data_dir: Path = Path("./var")
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    http_workers: int = Field(
        default=1, description="HTTP worker processes; 1 = all in one process, 0 = one per CPU"
    )
    mllp_port: int = 2575
    mllp_host: str = Field(default="127.0.0.1", description="MLLP listen address")
    mllp_max_message_bytes: int = Field(
        default=16 << 20, description="largest HL7 v2 message accepted over MLLP"
    )
    mllp_idle_timeout_seconds: float = Field(
        default=30.0,
        description="an MLLP connection silent (or stalled mid-frame) this long is closed",
    )
    mllp_workers: int = Field(
        default=2,
        ge=1,
        le=64,
        description="threads applying MLLP messages; the writes of those finishing together "
        "share one commit",
    )
    mllp_tls_cert: str = Field(default="", description="PEM server certificate: MLLP over TLS")
    mllp_tls_key: str = Field(default="", description="PEM private key of that certificate")
    mllp_tls_client_ca: str = Field(
        default="", description="PEM CA bundle: require client certificates signed by it"
    )
    dicom_port: int = 11112
    dicom_ae_title: str = "HUB"
    dicom_host: str = Field(default="127.0.0.1", description="DICOM listen address")
    dicom_tls_port: int = Field(
        default=0, description="DICOM over TLS on this port (2762 is DICOM's; 0: off)"
    )
    dicom_tls_cert: str = Field(default="", description="PEM server certificate: DICOM over TLS")
    dicom_tls_key: str = Field(default="", description="PEM private key of that certificate")
    dicom_tls_client_ca: str = Field(
        default="", description="PEM CA bundle: require DICOM client certificates signed by it"
    )
    dicom_timeout_seconds: float = Field(
        default=30.0,
        description="a DICOM association silent (or stalled mid-transfer) this long is aborted",
    )
    dicom_max_associations: int = Field(default=32, description="concurrent DICOM associations")
    dicom_query_limit: int = Field(
        default=1000,
        description="most matches one C-FIND or QIDO-RS query returns (a broad query is cut there)",
    )
    dicom_max_upload_bytes: int = Field(
        default=4 << 30, description="largest STOW-RS request body (streamed, refused beyond)"
    )
    dicom_summary_seconds: float = Field(
        default=1.0,
        description="how often the worker brings ImagingStudy instance counts up to the index",
    )
    dicom_journal_mb: int = Field(
        default=64,
        ge=0,
        description="segment size of the blob journal received DICOM files go to (0: off)",
    )
    database_url: str = ""
    blob_url: str = ""
    search_url: str = "embedded"
    s3_endpoint: str = ""
    s3_access_key: str = "hie"
    s3_secret_key: SecretStr = SecretStr(DEV_S3_SECRET)
    s3_secure: bool = False
    oidc_issuer: str = ""
    oidc_audience: str = Field(default="hie-hub", description="the aud tokens must carry")
    oidc_jwks_cache_seconds: float = 300.0
    auth_clock_skew_seconds: int = Field(default=60, description="exp/nbf leeway (max 300)")
    audit_url: str = Field(
        default="", description="audit trail database (default: audit.db beside a SQLite store)"
    )
    audit_chain: bool = Field(
        default=True,
        description="this process chains the audit records it writes ahead (off in hie serve's "
        "HTTP worker processes: their parent does it)",
    )
    audit_syslog_url: str = Field(
        default="",
        description="export the audit trail to a syslog/ATNA collector: udp://, tcp:// or tls://host:port",
    )
    audit_syslog_ca: str = Field(default="", description="PEM CA bundle for a tls:// collector")
    rate_limit_per_second: float = Field(
        default=200.0, description="requests per second per principal and process (0: no limit)"
    )
    rate_limit_burst: float = Field(default=400.0, description="burst above that rate")
    auth_enabled: bool = Field(
        default=True,
        description="require bearer tokens (false only for benchmarks; not in production)",
    )
    base_url: str = ""
    max_body_bytes: int = Field(default=1 << 20, description="request body limit outside documents")
    max_document_bytes: int = Field(default=64 << 20, description="body limit for documents")
    index_extract_processes: int = Field(
        default=-1,
        description="processes extracting document text for the search index "
        "(-1: one per CPU; 0: inside the outbox worker)",
    )
    index_max_lag_seconds: float = Field(
        default=1.0,
        description="document writes wait while the full-text index trails the hub by more "
        "than this (0: never)",
    )
    index_lag_wait_seconds: float = Field(
        default=30.0, description="longest such wait; the write then goes ahead"
    )
    index_lag_max_waiters: int = Field(
        default=8, description="writes that may wait at once; the next gets 503 + Retry-After"
    )
    page_size: int = 50
    max_page_size: int = 1000
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    worker: bool = True
    worker_poll_seconds: float = 0.2
    log_level: str = "INFO"
    log_format: Literal["json", "console"] = "json"
    alert_ack_minutes: float = Field(
        default=30.0,
        description="an unacknowledged critical-result alert escalates to the MO's duty role",
    )
    alert_escalate_minutes: float = Field(
        default=30.0, description="…and after this much longer, to the hub's duty operator"
    )
    alert_hub_operator: str = Field(
        default="",
        description="the hub's duty operator for escalated alerts (Practitioner or "
        "PractitionerRole reference); empty: the hub's duty PractitionerRole",
    )
    mpi_enabled: bool = Field(default=True, description="match every source Patient")
    mpi_auto_link_bits: float = Field(default=28.0, description="score that links on its own")
    mpi_review_bits: float = Field(default=16.0, description="score that asks an operator")
    mpi_registered_systems_only: bool = Field(
        default=True, description="refuse Patient identifier systems no MO registered"
    )

    @model_validator(mode="after")
    def _defaults_and_production_checks(self) -> Settings:
        if self.mpi_review_bits > self.mpi_auto_link_bits:
            raise ValueError("HIE_MPI_REVIEW_BITS must not exceed HIE_MPI_AUTO_LINK_BITS")
        if self.index_extract_processes < 0:
            self.index_extract_processes = os.cpu_count() or 1
        if self.dicom_tls_port and not self.dicom_tls_cert:
            raise ValueError("HIE_DICOM_TLS_PORT needs HIE_DICOM_TLS_CERT (and its key)")
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'hie.db'}"
        if not self.blob_url:
            self.blob_url = f"file://{(self.data_dir / 'blobs').resolve()}"
        if self.env == "production":
            if self.s3_endpoint and self.s3_secret_key.get_secret_value() == DEV_S3_SECRET:
                raise ValueError("HIE_S3_SECRET_KEY must be set in production")
            if not self.oidc_issuer:
                raise ValueError("HIE_OIDC_ISSUER must be set in production")
            if not self.auth_enabled:
                raise ValueError("HIE_AUTH_ENABLED=false is refused in production")
        return self

    @property
    def effective_http_workers(self) -> int:
        """How many HTTP worker processes ``hie serve`` runs."""
        if self.http_workers > 0:
            return self.http_workers
        return max(1, min(os.cpu_count() or 1, 4))

    @property
    def public_base(self) -> str:
        """Base URL the hub uses in links it returns (Location, paging links)."""
        return self.base_url.rstrip("/") or f"http://{self.http_host}:{self.http_port}"

    def redacted(self) -> dict[str, object]:
        """All settings as plain values with secrets (and credentials in URLs) hidden."""
        out: dict[str, object] = {}
        for name, value in self.model_dump().items():
            if isinstance(value, SecretStr):
                out[name] = "**********"
            elif isinstance(value, str) and "://" in value and "@" in value:
                scheme, rest = value.split("://", 1)
                creds, host = rest.rsplit("@", 1)
                user = creds.split(":", 1)[0]
                out[name] = f"{scheme}://{user}:***@{host}" if ":" in creds else value
            else:
                out[name] = str(value) if isinstance(value, Path) else value
        return out


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment, with explicit overrides (used by tests)."""
    return Settings(**overrides)  # type: ignore[arg-type]
