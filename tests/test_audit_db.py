"""The audit database itself: Alembic migrations (an older database opens in a newer pneumo), the
declarative models matching the migrations, and the whole trail against a real PostgreSQL server
that the test starts in a temporary folder and stops again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from conftest import free_port, one_torch_thread
from pneumo.audit.db import create_audit_engine, current_revision, database_url, head_revision, open_database, upgrade
from pneumo.audit.record import AuditTrail
from pneumo.audit.schema import Base
from pneumo.audit.summary import summarise
from pneumo.errors import PneumoError
from test_audit_record import jpeg_bytes, make_model_folder

FIRST = "0001"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with one_torch_thread():
        return make_model_folder(tmp_path_factory.mktemp("audit-db-run"))


def insert_first_release_reading(engine) -> None:  # noqa: ANN001 - an Engine at revision 0001
    """A model and a reading as pneumo's first audit trail (revision 0001) wrote them."""
    with engine.begin() as c:
        c.execute(
            text(
                "insert into models (id, arch, classes, positive_class, threshold_method, folder, first_seen) "
                "values ('m' || :pad, 'efficientnet_lite0', '[\"NORMAL\", \"PNEUMONIA\"]', 'PNEUMONIA', 'youden', "
                "null, :t)"
            ),
            {"pad": "0" * 63, "t": "2026-01-05 09:00:00"},
        )
        c.execute(
            text(
                "insert into readings (id, created_at, model_id, pneumo_version, runtime, source, image_sha256, "
                "width, height, image_format, probability, threshold, decision, in_scope, latency_ms) values "
                "('r1', :t, 'm' || :pad, '0.1.0', 'torch', 'serve', :sha, 10, 10, 'png', 0.8, 0.5, 'PNEUMONIA', "
                "null, 12.5)"
            ),
            {"pad": "0" * 63, "t": "2026-01-05 09:00:00", "sha": "a" * 64},
        )


def check_upgrade_from_first_revision(db: str) -> None:
    engine = create_audit_engine(database_url(db))
    upgrade(engine, FIRST)
    assert current_revision(engine) == FIRST
    assert "feedback" not in inspect(engine).get_table_names()
    insert_first_release_reading(engine)
    engine.dispose()

    engine = open_database(db)  # what a newer pneumo does on open
    assert current_revision(engine) == head_revision() != FIRST
    with engine.connect() as c:
        assert c.execute(text("select id, decision, image_kept from readings")).all() == [("r1", "PNEUMONIA", False)]
        c.execute(text("select count(*) from feedback")).scalar_one()
        diffs = compare_metadata(MigrationContext.configure(c), Base.metadata)
    assert diffs == [], f"schema.py and the migrations disagree: {diffs}"
    engine.dispose()


def test_a_first_release_database_opens_upgraded(tmp_path: Path) -> None:
    check_upgrade_from_first_revision(str(tmp_path / "old.sqlite"))


def test_a_database_from_a_newer_pneumo_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "new.sqlite"
    open_database(db).dispose()
    engine = create_audit_engine(database_url(db))
    with engine.begin() as c:
        c.execute(text("update alembic_version set version_num = '9999'"))
    engine.dispose()
    with pytest.raises(PneumoError, match="newer than this pneumo knows"):
        open_database(db)


def test_bad_database_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(PneumoError, match="SQLite or PostgreSQL"):
        create_audit_engine("mysql://someone@host/db")
    with pytest.raises(PneumoError, match="is a folder"):
        open_database(tmp_path)
    with pytest.raises(PneumoError, match="--db PATH"):
        database_url(None, None)
    assert database_url("postgresql://u@h:5/d") == "postgresql+psycopg://u@h:5/d"


# ---------------------------------------------------------------- a real PostgreSQL server


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free loopback port; as root, run as the postgres user."""
    pytest.importorskip("psycopg", reason="the postgres extra (psycopg) is not installed")
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL's initdb/pg_ctl are not on PATH (Debian: apt-get install postgresql)")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="pneumo-pg-"))
    if os.geteuid() == 0:  # initdb refuses to run as root
        runuser = shutil.which("runuser")
        try:
            import pwd

            pw = pwd.getpwnam("postgres")
        except KeyError:
            pw = None
        if not (runuser and pw):
            shutil.rmtree(folder)
            pytest.skip("running as root and no 'postgres' user (or runuser) to start PostgreSQL as")
        os.chown(folder, pw.pw_uid, pw.pw_gid)
        as_user = [runuser, "-u", "postgres", "--"]
    data, port = folder / "data", free_port()
    run = lambda *cmd: subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)  # noqa: E731
    made = run(initdb, "-D", str(data), "-U", "pneumo", "--auth=trust", "--no-sync")
    if made.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"initdb failed: {made.stderr.strip()[-300:]}")
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    started = run(pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "-t", "60", "start")
    try:
        assert started.returncode == 0, f"pg_ctl start failed: {started.stderr} {started.stdout}"
        yield f"postgresql://pneumo@127.0.0.1:{port}/postgres"
    finally:
        run(pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def reset(url: str) -> None:
    engine = create_audit_engine(database_url(url))
    with engine.begin() as c:
        c.execute(text("drop table if exists feedback, readings, models, alembic_version cascade"))
    engine.dispose()


def test_postgres_upgrades_from_the_first_revision(postgres_url: str) -> None:
    reset(postgres_url)
    check_upgrade_from_first_revision(postgres_url)


def test_postgres_records_readings_feedback_and_summarises(postgres_url: str, model_dir: Path) -> None:
    reset(postgres_url)
    trail = AuditTrail.open(postgres_url, model_dir)
    ids = [trail.record_reading(jpeg_bytes(i), [1 - p, p], 10.0) for i, p in enumerate([0.9, 0.2, 0.7, 0.1])]
    trail.record_feedback(ids[0], agreed=True)
    trail.record_feedback(ids[1], agreed=False, note="subtle opacity")  # a missed pneumonia
    trail.close()
    (m,) = summarise(postgres_url)["models"]
    assert m["readings"] == 4 and m["decisions"]["PNEUMONIA"]["n"] == 2
    assert m["readers"]["agreement"] == 0.5
    assert m["readers"]["metrics"]["sensitivity"] == 0.5 and m["readers"]["metrics"]["tp"] == 1
    assert m["drift"]["reference"]["n"] == 201 and len(m["drift"]["weeks"]) == 1
    engine = open_database(postgres_url)
    with engine.connect() as c:
        created = c.execute(text("select created_at from readings limit 1")).scalar_one()
    engine.dispose()
    assert created.utcoffset() is not None  # timestamptz: stored with its zone
