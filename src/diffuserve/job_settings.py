"""The settings of jobs, webhooks and priority classes (a base of the server's Settings, kept apart for size)."""

from __future__ import annotations

import base64

from pydantic import field_validator

from diffuserve.envsettings import EnvSettings, setting
from diffuserve.extras import install_command, missing_modules

WEBHOOK_SECRET_PREFIX = "whsec_"


def webhook_key(secret: str) -> bytes:
    """The signing key of a `whsec_<base64>` secret (Standard Webhooks' form); ValueError otherwise."""
    problem = f"must be {WEBHOOK_SECRET_PREFIX} followed by the base64 of at least 16 random bytes"
    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        raise ValueError(problem)
    try:
        key = base64.b64decode(secret.removeprefix(WEBHOOK_SECRET_PREFIX), validate=True)
    except ValueError:
        raise ValueError(problem) from None
    if len(key) < 16:
        raise ValueError(problem)
    return key


class JobSettings(EnvSettings):
    """Asynchronous jobs (`/v1/images/jobs`), their webhooks, and how the queue serves priority classes."""

    jobs_db: str | None = setting(
        None,
        "JOBS_DB",
        secret=True,  # a URL may carry a password
        repr=False,
        help="where jobs are kept across restarts: a SQLite file path, or a database URL "
        "(postgresql://…, needs the jobs-postgres extra); unset = in memory, lost on restart",
    )
    job_ttl_seconds: float = setting(
        86400.0, "JOB_TTL_SECONDS", help="how long a finished job (and its images) can be read", gt=0
    )
    max_jobs: int = setting(
        10000, "MAX_JOBS", help="most unfinished jobs at once; beyond it a new job is answered 429", ge=1
    )
    job_timeout: float = setting(
        86400.0, "JOB_TIMEOUT", help="seconds a job may wait and run before it fails", gt=0
    )
    webhook_secret: str | None = setting(
        None,
        "WEBHOOK_SECRET",
        secret=True,
        repr=False,
        help="the Standard Webhooks signing key, whsec_<base64> of 16+ bytes; a job's webhook_url is refused "
        "(400) while it is unset",
    )
    webhook_allow_private: bool = setting(
        False,
        "WEBHOOK_ALLOW_PRIVATE",
        help="let webhooks go to loopback, private and link-local addresses (refused by default)",
    )
    webhook_attempts: int = setting(
        6, "WEBHOOK_ATTEMPTS", help="deliveries tried per webhook before it is given up", ge=1, le=20
    )
    webhook_backoff_seconds: float = setting(
        2.0,
        "WEBHOOK_BACKOFF_SECONDS",
        help="wait before the second delivery; doubled after each failure (at most 5 min)",
        gt=0,
    )
    webhook_timeout: float = setting(10.0, "WEBHOOK_TIMEOUT", help="seconds one delivery may take", gt=0)
    priority_aging_seconds: float = setting(
        30.0,
        "PRIORITY_AGING_SECONDS",
        help="a waiting request rises one priority class per this many seconds (0 = never), so none starves",
        ge=0,
    )
    preempt: bool = setting(
        True,
        "PREEMPT",
        help="an interactive request may stop a running batch of batch-priority work at its next step when "
        "every worker is busy (the batch runs again from the start)",
    )

    @field_validator("jobs_db")
    @classmethod
    def _database_driver(cls, value: str | None) -> str | None:
        """A PostgreSQL URL needs psycopg: said at start, in one line, rather than when the first job comes."""
        scheme = (value or "").split("://", 1)[0].split("+", 1)[0]
        if scheme in ("postgres", "postgresql") and missing_modules("jobs-postgres"):
            raise ValueError(
                f"a PostgreSQL URL needs the jobs-postgres extra: {install_command('jobs-postgres')}"
            )
        return value or None

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_key(cls, value: str | None) -> str | None:
        if value:
            webhook_key(value)
        return value or None
