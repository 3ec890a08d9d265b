"""Where a run's Optuna study lives: SQLite in the run folder, a database server or a journal file.

Several ``autocomp search`` workers, on one machine or several, share a study by
opening the same storage; see :func:`autocomp.search.workers.run_trials`.
"""

import importlib.util
import sqlite3
from pathlib import Path

import optuna
import sqlalchemy.exc
from sqlalchemy.engine import URL, make_url

from autocomp.core.errors import AutocompError

JOURNAL_SUFFIXES = (".journal", ".log")
USAGE = ("use postgresql://USER:PASSWORD@HOST/DB, mysql://USER:PASSWORD@HOST/DB, sqlite:///PATH, "
         "journal:PATH or a file name ending in .journal")
# Per URL scheme: the SQLAlchemy drivers tried in order, and the pip package to name if none is there.
DRIVERS = {"postgresql": (("psycopg2", "psycopg"), "psycopg2-binary"),
           "mysql": (("pymysql", "MySQLdb"), "pymysql")}
# SQLAlchemy driver name -> (module to import, pip package).
DRIVER_MODULE = {"psycopg2": ("psycopg2", "psycopg2-binary"), "psycopg": ("psycopg", "psycopg[binary]"),
                 "pymysql": ("pymysql", "pymysql"), "mysqldb": ("MySQLdb", "mysqlclient")}


# Storage URLs given to this process with their passwords, by the URL without it (what
# run.json keeps): a later open in the same process (the report at the end of a search)
# needs no password from the environment.
_given: dict[str, str] = {}


def open_storage(url: str | None, run_dir: Path) -> optuna.storages.BaseStorage:
    """The storage named by ``url`` (``--storage``), or ``run_dir/study.db`` when it is None.

    Errors the user can cause (unknown scheme, missing driver, unreachable server,
    bad credentials, an unwritable file) raise AutocompError with one line.
    """
    journal = _journal_path(url)
    if journal is not None:
        return _open_journal(journal)
    if url is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{(run_dir / 'study.db').resolve()}"
    elif (bare := without_password(url)) != url:
        _given[bare] = url
    else:
        url = _given.get(url, url)  # run.json's URL, whose password this process was given
    return _open_rdb(_with_driver(url), shown=_masked(url))



def describe_storage(url: str | None, run_dir: Path) -> str:
    """The storage for logs and reports, with any password masked."""
    journal = _journal_path(url)
    if journal is not None:
        return f"journal file {journal}"
    if url is None:
        return f"SQLite {run_dir / 'study.db'}"
    return _masked(url)


def without_password(url: str | None) -> str | None:
    """``url`` with its password left out, to be written to disk (``run.json``): whoever opens
    the run later gives the password as PostgreSQL and MySQL clients do (``PGPASSWORD`` or
    ``~/.pgpass``; ``MYSQL_PWD``)."""
    if url is None or _journal_path(url) is not None:
        return url
    try:
        parsed = make_url(url.strip())
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return _masked(url)
    if parsed.password is None:
        return url
    bare = URL.create(parsed.drivername, parsed.username, None, parsed.host, parsed.port, parsed.database,
                      parsed.query)
    return bare.render_as_string(hide_password=False)


def _journal_path(url: str | None) -> Path | None:
    if url is None:
        return None
    url = url.strip()
    if url.startswith("journal:"):
        path = url[len("journal:"):]
        if path.startswith("//"):  # journal:///abs/path
            path = path[2:]
        if not path:
            raise AutocompError(f"storage {url!r} names no file; {USAGE}")
        return Path(path).expanduser().resolve()
    if "://" not in url and url.endswith(JOURNAL_SUFFIXES):
        return Path(url).expanduser().resolve()
    return None


def _open_journal(path: Path) -> optuna.storages.BaseStorage:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    except OSError as err:
        raise AutocompError(f"cannot open the journal file {path}: {err.strerror or err}") from None


def _with_driver(url: str) -> str:
    """``url`` with an installed SQLAlchemy driver named (SQLAlchemy 2.1 defaults PostgreSQL
    to psycopg 3, which we do not ship; psycopg2 is a dependency)."""
    url = url.strip()
    if "://" not in url:
        raise AutocompError(f"unknown storage {_masked(url)!r}: {USAGE}")
    scheme, rest = url.split("://", 1)
    dialect, _, driver = scheme.partition("+")
    dialect = {"postgres": "postgresql", "mariadb": "mysql"}.get(dialect, dialect)
    if dialect == "sqlite":
        return url
    if dialect not in DRIVERS:
        raise AutocompError(f"unknown storage {_masked(url)!r}: {USAGE}")
    candidates, package = DRIVERS[dialect]
    if driver:
        module, package = DRIVER_MODULE.get(driver.lower(), (driver, driver))
        if importlib.util.find_spec(module) is None:
            raise AutocompError(f"the {dialect} storage driver {driver!r} is not installed: "
                                f"pip install {package}")
        return f"{dialect}+{driver}://{rest}"
    for module in candidates:
        if importlib.util.find_spec(module) is not None:
            return f"{dialect}+{module.lower()}://{rest}"
    raise AutocompError(f"a {dialect} storage needs a database driver: pip install {package}")


def _open_rdb(url: str, shown: str) -> optuna.storages.RDBStorage:
    engine_kwargs: dict = {}
    if url.startswith("sqlite"):
        # Several local workers (and the heartbeat thread) share the file: wait for its lock.
        engine_kwargs["connect_args"] = {"timeout": 60}
    else:
        engine_kwargs["pool_pre_ping"] = True  # a worker outlives idle server connections
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, ImportError,
            RuntimeError, ValueError) as err:
        reason = _first_line(err)
        if "password" in reason.lower() and not _has_password(url):
            reason += " (the URL has no password: give it in PGPASSWORD or ~/.pgpass, or in the URL)"
        raise AutocompError(f"cannot open the storage {shown}: {reason}") from None


# What SQLite and PostgreSQL say when the disk is full or the file read-only.
_FULL_OR_READ_ONLY = ("disk is full", "no space left", "readonly database", "read-only", "disk quota")


def refused_write(err: BaseException) -> str | None:
    """Why the storage refused to store something, when it is the machine's to fix (a full
    disk or quota, a read-only file): the database's own message, else None. Optuna wraps
    it (``StorageInternalError`` from SQLAlchemy's ``OperationalError``)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = _first_line(current)
        if isinstance(current, (sqlalchemy.exc.OperationalError, sqlite3.OperationalError)) and any(
                words in text.lower() for words in _FULL_OR_READ_ONLY):
            return text
        current = current.__cause__ or current.__context__
    return None


def _has_password(url: str) -> bool:
    try:
        return make_url(url).password is not None
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return True


def _first_line(err: BaseException) -> str:
    """The most specific one-line reason: the database driver's message when there is one."""
    while isinstance(err, ImportError) and err.__cause__ is not None:
        err = err.__cause__
    cause = getattr(err, "orig", None) or err
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    text = " ".join(lines[0].split()) if lines else type(cause).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _masked(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return url.split("@")[-1] if "@" in url else url
