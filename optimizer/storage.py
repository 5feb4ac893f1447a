"""Where the study lives: Optuna's RDB storage, SQLite in the output directory or a shared PostgreSQL.

All state is in the storage, not in a process: that is why a killed run resumes and why workers on
several machines can share one study. Each running trial sends a heartbeat; a trial whose heartbeat
stops (its process was killed) is marked failed by the next worker that looks, and its parameters are
queued again once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, ProgrammingError, SQLAlchemyError

from nkat_gguf.errors import InputError

HEARTBEAT_SECONDS = 2
GRACE_SECONDS = 10  # five missed heartbeats: the trial belongs to a dead process
CONNECT_TIMEOUT_SECONDS = 10
TABLE_RACE_ATTEMPTS = 3
DB_NAME = "optuna_study.db"
SETTINGS_ATTR = "settings"


def storage_url(storage: str | None, output_dir: Path) -> str:
    """The given URL, else SQLite in the output directory."""
    return storage or f"sqlite:///{(output_dir / DB_NAME).resolve()}"


def public_url(url: str) -> str:
    """The URL with its password masked, for outputs and messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def _reason(exc: BaseException) -> str:
    """The driver's own first line (sqlalchemy wraps it in SQL and a link)."""
    text = str(getattr(exc, "orig", None) or exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def open_storage(url: str) -> RDBStorage:
    """Connect (creating Optuna's tables if needed); an unreachable or malformed URL is one InputError.

    Workers started together race to create the tables; the loser's duplicate-table error is retried.
    """
    postgres = url.startswith("postgres")
    engine_kwargs = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_SECONDS}} if postgres else None
    for attempt in range(1, TABLE_RACE_ATTEMPTS + 1):
        try:
            return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_SECONDS,
                              grace_period=GRACE_SECONDS,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
        except (IntegrityError, ProgrammingError) as exc:
            failure: BaseException = exc
            if attempt < TABLE_RACE_ATTEMPTS:
                time.sleep(1.0)
                continue
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            failure = exc
        raise InputError(f"cannot open storage {public_url(url)}: {_reason(failure)}") from None
    raise AssertionError("TABLE_RACE_ATTEMPTS must be >= 1")


def open_study(storage: RDBStorage, name: str, directions: list[str],
               settings: dict[str, Any]) -> tuple[optuna.Study, bool]:
    """The study and whether this call created it; a study made with other settings is refused."""
    settings = json.loads(json.dumps(settings))  # as the storage will return it
    try:
        study = optuna.create_study(storage=storage, study_name=name, directions=directions)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage)
    else:
        study.set_user_attr(SETTINGS_ATTR, settings)
        return study, True
    there = [d.name.lower() for d in study.directions]
    if there != directions:
        raise InputError(f"study {name!r} in {public_url(storage.url)} optimizes {there}, this run {directions} "
                         "(--pareto differs); use the same options or another --study-name")
    stored = study.user_attrs.get(SETTINGS_ATTR)
    if stored is not None and stored != settings:
        diff = ", ".join(f"{k}: {stored.get(k)!r} there, {settings.get(k)!r} here"
                         for k in sorted(set(stored) | set(settings)) if stored.get(k) != settings.get(k))
        raise InputError(f"study {name!r} in {public_url(storage.url)} was made with other settings ({diff}); "
                         "use the same options or another --study-name")
    return study, False


def adopt_running_trials(storage: RDBStorage, trials: list[FrozenTrial], adopted: set[int]) -> None:
    """Give each running trial seen for the first time one heartbeat, stamped by the database.

    Optuna starts a trial's heartbeat only after sampling its parameters and never fails a running trial
    that has none: a worker killed in between would leave a trial every other worker waits for forever.
    With one heartbeat it goes stale like any dead trial; a live one keeps beating.
    """
    for trial in trials:
        if trial.state == TrialState.RUNNING and trial._trial_id not in adopted:
            storage.record_heartbeat(trial._trial_id)
            adopted.add(trial._trial_id)

