"""Databases behind the AgentBench DB environment: SQLite (embedded) and MySQL/MariaDB (real server).

Every task gets a fresh database holding its one table (all columns TEXT, as AgentBench builds them).
Agent SQL is contained: per-statement timeout, result truncation, no ATTACH / extension loading /
file access. A failing statement returns the database's error text as the observation.

Modification tasks are scored by AgentBench's table hash:
    md5(group_concat(rowhash ORDER BY rowhash)) over rowhash = substring(md5(concat_ws(',', cols...)), 1, 5)
rendered as `str(list(cursor.fetchall()))`, e.g. "[('09aa8fbf72f39362970f95a1276b957c',)]".
MySQL computes it with that very query; SQLite (3.40 has no ORDER BY inside aggregates) computes the
same bytes in Python, including MySQL's default group_concat_max_len of 1024 bytes.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from cmat_pipeline.errors import BackendError

MYSQL_GROUP_CONCAT_MAX_LEN = 1024  # MySQL/MariaDB default; AgentBench's labels were hashed with it
TRUNCATION_MARK = "[TRUNCATED]"
MAX_FETCH_ROWS = 1000  # never pull more rows than could be shown; the observation is cut anyway
# Statements that reach files or other databases; refused before they reach either engine.
FORBIDDEN_SQL = re.compile(
    r"\b(attach|detach|load_extension|vacuum\s+into|into\s+(out|dump)file|load\s+data|load_file|"
    r"readfile|writefile|edit|fts3_tokenizer)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class TableSpec:
    """The one table of a dbbench task."""

    name: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]


def as_text(value: Any) -> str | None:
    """Cell value as stored in a TEXT column (same text on both backends)."""
    return None if value is None else str(value)


def render_rows(rows: Sequence[Sequence[Any]]) -> str:
    """Result set as AgentBench shows it: the repr of a list of tuples."""
    return str([tuple(row) for row in rows])


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + TRUNCATION_MARK


def agentbench_table_hash(rows: Sequence[Sequence[Any]]) -> str:
    """AgentBench's table hash of `rows` (TEXT cells or None), exactly as MySQL computes it."""
    if not rows:
        return render_rows([(None,)])
    row_hashes = sorted(
        hashlib.md5(",".join(cell for cell in row if cell is not None).encode()).hexdigest()[:5] for row in rows
    )
    concatenated = ",".join(row_hashes).encode()[:MYSQL_GROUP_CONCAT_MAX_LEN]
    return render_rows([(hashlib.md5(concatenated).hexdigest(),)])


def forbidden_reason(sql: str) -> str | None:
    match = FORBIDDEN_SQL.search(sql)
    return f"statement refused by the sandbox: `{match.group(0)}` is not allowed" if match else None


class TaskDatabase(Protocol):
    """A live database for one task."""

    def execute(self, sql: str) -> str:
        """Run one agent statement; return the observation text (rows, or the error)."""

    def table_hash(self) -> str:
        """AgentBench's hash of the task table in its current state."""

    def close(self) -> None:
        """Drop the database and release the connection."""


class SQLBackend(Protocol):
    def open(self, table: TableSpec) -> TaskDatabase:
        """A fresh database holding `table`."""

    def close(self) -> None:
        """Release what the backend set up on the server."""


# --------------------------------------------------------------------------------------- SQLite


def _mysql_to_sqlite(sql: str) -> str:
    """Translate MySQL syntax to SQLite and make `text_col < 17` compare numerically as MySQL does.

    Columns are TEXT; SQLite would compare them with a number as text ('9' > '17'), MySQL as numbers.
    Unparseable SQL is returned unchanged so that SQLite reports its own error.
    """
    import sqlglot
    from sqlglot import exp

    try:
        tree = sqlglot.parse_one(sql, read="mysql")
    except Exception:  # sqlglot's ParseError/TokenError: let the engine speak
        return sql

    def cast_numeric_comparison(node: exp.Expression) -> exp.Expression:
        if isinstance(node, exp.EQ) and isinstance(node.parent, exp.Update):
            return node  # `SET col = 7` is an assignment, not a comparison
        if isinstance(node, (exp.GT, exp.GTE, exp.LT, exp.LTE, exp.EQ, exp.NEQ)):
            left, right = node.left, node.right
            if isinstance(left, exp.Column) and isinstance(right, exp.Literal) and not right.is_string:
                node.set("this", exp.cast(left, "REAL"))
            elif isinstance(right, exp.Column) and isinstance(left, exp.Literal) and not left.is_string:
                node.set("expression", exp.cast(right, "REAL"))
        return node

    try:
        return tree.transform(cast_numeric_comparison).sql(dialect="sqlite")
    except Exception:
        return sql


class SQLiteDatabase:
    def __init__(self, table: TableSpec, timeout_s: float, max_chars: int):
        self.table = table
        self.timeout_s = timeout_s
        self.max_chars = max_chars
        self.conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        columns = ", ".join(f'"{_sqlite_ident(c)}" TEXT COLLATE NOCASE' for c in table.columns)  # MySQL's _ci
        self.conn.execute(f'CREATE TABLE "{_sqlite_ident(table.name)}" ({columns})')
        marks = ", ".join("?" for _ in table.columns)
        self.conn.executemany(
            f'INSERT INTO "{_sqlite_ident(table.name)}" VALUES ({marks})',
            [tuple(as_text(v) for v in row) for row in table.rows],
        )
        self.conn.set_authorizer(_sqlite_authorizer)

    def execute(self, sql: str) -> str:
        refused = forbidden_reason(sql)
        if refused:
            return refused
        deadline = time.monotonic() + self.timeout_s
        self.conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
        try:
            cursor = self.conn.execute(_mysql_to_sqlite(sql))
            rows = cursor.fetchmany(MAX_FETCH_ROWS) if cursor.description else []
            text = render_rows(rows)
        except sqlite3.Error as err:
            text = "statement timed out" if time.monotonic() > deadline else str(err)
        finally:
            self.conn.set_progress_handler(None, 0)
        return truncate(text, self.max_chars)

    def table_hash(self) -> str:
        columns = ", ".join(f'"{_sqlite_ident(c)}"' for c in self.table.columns)
        self.conn.set_authorizer(None)
        try:
            rows = self.conn.execute(f'SELECT {columns} FROM "{_sqlite_ident(self.table.name)}"').fetchall()
        except sqlite3.Error:  # the agent dropped or renamed the table: AgentBench gets an error string too
            return "table missing"
        finally:
            self.conn.set_authorizer(_sqlite_authorizer)
        return agentbench_table_hash([[as_text(v) for v in row] for row in rows])

    def close(self) -> None:
        self.conn.close()


def _sqlite_ident(name: str) -> str:
    return name.replace('"', '""')


def _sqlite_authorizer(action: int, arg1: Any, arg2: Any, db_name: Any, source: Any) -> int:
    if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION and str(arg2).lower() in {"load_extension", "readfile", "writefile"}:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_PRAGMA and str(arg1).lower() not in {"table_info", "table_xinfo", "table_list"}:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


@dataclass
class SQLiteBackend:
    timeout_s: float = 5.0
    max_chars: int = 800

    def open(self, table: TableSpec) -> SQLiteDatabase:
        return SQLiteDatabase(table, self.timeout_s, self.max_chars)

    def close(self) -> None:
        """Nothing outlives a task's in-memory database."""


# ---------------------------------------------------------------------------------------- MySQL


def _mysql_ident(name: str) -> str:
    return name.replace("`", "``")


def mysql_columns(table: TableSpec) -> list[str]:
    """Column names as MySQL can hold them: it rejects empty names (dbbench dev task 5 has one)."""
    return [_mysql_ident(c) if c.strip() else f"column_{i + 1}" for i, c in enumerate(table.columns)]


@dataclass
class MySQLBackend:
    """A MySQL or MariaDB server. An admin account creates one database per task; agent SQL runs as a
    dedicated account that can touch only `cmat_%` databases and has no FILE privilege."""

    host: str = "127.0.0.1"
    port: int = 3306
    user: str = "root"
    password: str = ""
    unix_socket: str = ""
    timeout_s: float = 5.0
    max_chars: int = 800

    def __post_init__(self) -> None:
        # One agent account per backend instance, so concurrent runs on one server never share a password.
        self._agent_user = f"cmat_agent_{secrets.token_hex(4)}"
        self._agent_password = secrets.token_hex(16)
        admin = self._connect(self.user, self.password)
        try:
            self.is_mariadb = "mariadb" in admin.get_server_info().lower()
            with admin.cursor() as cur:
                cur.execute("CREATE USER %s@'%%' IDENTIFIED BY %s", (self._agent_user, self._agent_password))
                cur.execute(f"GRANT ALL PRIVILEGES ON `cmat\\_%`.* TO '{self._agent_user}'@'%'")
        finally:
            admin.close()

    def close(self) -> None:
        """Drop the agent account."""
        admin = self._connect(self.user, self.password)
        try:
            with admin.cursor() as cur:
                cur.execute("DROP USER IF EXISTS %s@'%%'", (self._agent_user,))
        finally:
            admin.close()

    @classmethod
    def from_config(cls, cfg: Any, timeout_s: float, max_chars: int) -> "MySQLBackend":
        """From `DBConfig.mysql`; the password comes from the environment variable it names."""
        return cls(
            host=cfg.host, port=cfg.port, user=cfg.user, password=os.environ.get(cfg.password_env, ""),
            unix_socket=cfg.unix_socket, timeout_s=timeout_s, max_chars=max_chars,
        )

    def _connect(self, user: str, password: str, database: str | None = None):
        import pymysql

        where = self.unix_socket or f"{self.host}:{self.port}"
        try:
            return pymysql.connect(
                host=self.host, port=self.port, user=user, password=password, database=database,
                unix_socket=self.unix_socket or None, autocommit=True, charset="utf8mb4", connect_timeout=10,
            )
        except pymysql.err.OperationalError as err:
            raise BackendError(
                f"cannot connect to MySQL/MariaDB at {where} as {user!r}: {err.args[-1]} "
                "(check db.mysql in params.yaml and the password environment variable it names)"
            ) from None

    def open(self, table: TableSpec) -> "MySQLDatabase":
        name = f"cmat_{os.getpid()}_{secrets.token_hex(6)}"
        admin = self._connect(self.user, self.password)
        try:
            with admin.cursor() as cur:
                cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
                cur.execute(f"USE `{name}`")
                columns = ", ".join(f"`{c}` TEXT" for c in mysql_columns(table))
                cur.execute(f"CREATE TABLE `{_mysql_ident(table.name)}` ({columns})")
                if table.rows:
                    marks = "(" + ", ".join(["%s"] * len(table.columns)) + ")"
                    cur.executemany(
                        f"INSERT INTO `{_mysql_ident(table.name)}` VALUES {marks}",
                        [tuple(as_text(v) for v in row) for row in table.rows],
                    )
        finally:
            admin.close()
        return MySQLDatabase(self, name, table)


class MySQLDatabase:
    def __init__(self, backend: MySQLBackend, name: str, table: TableSpec):
        self.backend, self.name, self.table = backend, name, table
        self.conn = backend._connect(backend._agent_user, backend._agent_password, database=name)
        with self.conn.cursor() as cur:
            if backend.is_mariadb:
                cur.execute(f"SET SESSION max_statement_time = {backend.timeout_s:.3f}")
            else:
                cur.execute(f"SET SESSION max_execution_time = {int(backend.timeout_s * 1000)}")

    def execute(self, sql: str) -> str:
        import pymysql

        refused = forbidden_reason(sql)
        if refused:
            return refused
        try:
            with self.conn.cursor() as cur:
                cur.execute(sql)
                rows = cur.fetchmany(MAX_FETCH_ROWS) if cur.description else []
                text = render_rows(rows)
        except pymysql.err.MySQLError as err:
            text = f"{err.args[0]}: {err.args[1]}" if len(err.args) == 2 else str(err)
            if not self.conn.open:
                self.conn = self.backend._connect(self.backend._agent_user, self.backend._agent_password, self.name)
        return truncate(text, self.backend.max_chars)

    def table_hash(self) -> str:
        columns = ",".join(f"`{c}`" for c in mysql_columns(self.table))
        query = (
            "select md5(group_concat(rowhash order by rowhash)) as hash from( SELECT "
            f"substring(MD5(CONCAT_WS(',', {columns})), 1, 5) AS rowhash FROM `{_mysql_ident(self.table.name)}`) as sub;"
        )
        return self.execute(query)

    def close(self) -> None:
        try:
            self.conn.close()
        finally:
            admin = self.backend._connect(self.backend.user, self.backend.password)
            try:
                with admin.cursor() as cur:
                    cur.execute(f"DROP DATABASE IF EXISTS `{self.name}`")
            finally:
                admin.close()


def make_backend(db_cfg: Any) -> SQLBackend:
    """The backend `db.backend` names, built from `DBConfig`."""
    if db_cfg.backend == "mysql":
        return MySQLBackend.from_config(db_cfg.mysql, db_cfg.statement_timeout_s, db_cfg.max_observation_chars)
    return SQLiteBackend(db_cfg.statement_timeout_s, db_cfg.max_observation_chars)
