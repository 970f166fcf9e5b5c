"""``replicate_ddl = true`` on three real nodes: a migration run once, on one node, reaches every
node in order with the rows (Django ``migrate`` with a table rebuild, Alembic batch mode,
``sqlite-utils transform``), a node stopped during a migration catches up, two nodes changing one
table at once end with one schema, and a change harmonylite cannot replay is refused.

The three nodes live for the whole module (SHARED_CLUSTER_MODULES); each test uses its own
tables.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodes import NodeProc, stop_leftovers, wait_until
from servers import NatsServer

pytest.importorskip("django")
pytest.importorskip("alembic")

SETTINGS = """
import os

SECRET_KEY = "not-secret"
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes", "library"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.environ["APP_DB"],
                         "OPTIONS": {"timeout": 20, "transaction_mode": "IMMEDIATE"}}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
"""

MODELS = """
import os

from django.db import models


class Author(models.Model):
    name = models.CharField(max_length=100)


class Book(models.Model):
    author = models.ForeignKey(Author, on_delete=models.CASCADE)
    if os.environ.get("LIBRARY_V2"):  # the code after the second migration
        title = models.CharField(max_length=200)
        isbn = models.CharField(max_length=20, default="")
    else:
        title = models.CharField(max_length=100)
"""

ID = '("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False))'

M0001 = f"""
import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies = []
    operations = [
        migrations.CreateModel(name="Author", fields=[
            {ID}, ("name", models.CharField(max_length=100))]),
        migrations.CreateModel(name="Book", fields=[
            {ID}, ("title", models.CharField(max_length=100)),
            ("author", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE,
                                         to="library.author"))]),
    ]
"""

# A NOT NULL column with a Python default and a changed max_length: Django rebuilds
# library_book (create new, copy, drop, rename).
M0002 = """
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("library", "0001_initial")]
    operations = [
        migrations.AddField(model_name="book", name="isbn",
                            field=models.CharField(default="", max_length=20)),
        migrations.AlterField(model_name="book", name="title",
                              field=models.CharField(max_length=200)),
    ]
"""

ALEMBIC_ENV = """
import os

from alembic import context
from sqlalchemy import create_engine

engine = create_engine("sqlite:///" + os.environ["APP_DB"], connect_args={"timeout": 20})
with engine.connect() as connection:
    context.configure(connection=connection, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
"""

ALEMBIC_S1 = """
import sqlalchemy as sa
from alembic import op

revision = "s1"
down_revision = None


def upgrade():
    op.create_table("shelf", sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("title", sa.String(100), nullable=False))
    op.execute("INSERT INTO shelf (id, title) VALUES (1, 'Dune')")
    with op.batch_alter_table("shelf", recreate="always") as batch:
        batch.add_column(sa.Column("isbn", sa.String(20), nullable=False, server_default=""))
        batch.alter_column("title", type_=sa.String(200))
"""


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())


def schema(n: NodeProc) -> list[tuple[Any, ...]]:
    return n.query("SELECT type, name, tbl_name, sql FROM sqlite_schema WHERE sql IS NOT NULL "
                   "AND name NOT LIKE '\\_\\_harmonylite\\_\\_%' ESCAPE '\\' "
                   "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name")


def dump(n: NodeProc, table: str) -> list[tuple[Any, ...]]:
    try:
        return sorted(n.query(f'SELECT * FROM "{table}"'), key=repr)
    except sqlite3.OperationalError as exc:
        return [("error", str(exc))]


class Rig:
    def __init__(self, base: Path) -> None:
        self.nats = NatsServer(base / "nats-store").start()
        self.nodes = [NodeProc(base / f"node{i}", i, {"replicate_ddl": True,
                                                      "nats": {"urls": [self.nats.url]}})
                      for i in (1, 2, 3)]
        for n in self.nodes:
            n.execute("PRAGMA user_version = 0")  # a new cluster: empty databases
            n.start_async()
        for n in self.nodes:
            n.wait_started()
        self.app = base / "app"
        write(self.app / "site_settings.py", SETTINGS)
        write(self.app / "library" / "__init__.py", "")
        write(self.app / "library" / "models.py", MODELS)
        write(self.app / "library" / "migrations" / "__init__.py", "")
        write(self.app / "library" / "migrations" / "0001_initial.py", M0001)
        write(self.app / "alembic.ini", "[alembic]\nscript_location = %(here)s/shelf\n")
        write(self.app / "shelf" / "env.py", ALEMBIC_ENV)
        write(self.app / "shelf" / "versions" / "s1.py", ALEMBIC_S1)

    def close(self) -> None:
        for n in self.nodes:
            n.stop()
        self.nats.stop()

    def run(self, n: NodeProc, *args: str) -> str:
        env = {**os.environ, "PYTHONPATH": str(self.app), "DJANGO_SETTINGS_MODULE":
               "site_settings", "APP_DB": str(n.db),
               "LIBRARY_V2": "1" if (self.app / "library" / "migrations" / "0002_isbn.py"
                                     ).exists() else ""}
        out = subprocess.run(list(args), capture_output=True, text=True, env=env,
                             cwd=self.app, timeout=120)
        assert out.returncode == 0, f"{args} failed:\n{out.stdout}\n{out.stderr}"
        return out.stdout

    def django(self, n: NodeProc, *args: str) -> str:
        return self.run(n, sys.executable, "-m", "django", *args)

    def converged(self, tables: list[str], what: str,
                  nodes: list[NodeProc] | None = None) -> None:
        nodes = nodes or self.nodes

        def same() -> bool:
            for n in nodes:
                left = n.query("SELECT (SELECT count(*) FROM __harmonylite__log WHERE id > "
                               "(SELECT v FROM __harmonylite__state WHERE k = 'published')), "
                               "(SELECT count(*) FROM __harmonylite__parked)")[0]
                if left != (0, 0):
                    return False
            first = nodes[0]
            return all(schema(n) == schema(first) for n in nodes) and all(
                dump(n, t) == dump(first, t) for n in nodes for t in tables)
        try:
            wait_until(same, 60, what)
        except AssertionError:
            raise AssertionError(
                f"{what}: " + "\n".join(f"node {n.node_id}: {schema(n)}\n"
                                        f"{[dump(n, t) for t in tables]}\n"
                                        f"{n.log_text()[-2500:]}" for n in nodes)) from None


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    r = Rig(tmp_path_factory.mktemp("ddl"))
    try:
        yield r
    finally:
        r.close()
        stop_leftovers()


@pytest.fixture(autouse=True)
def _stop_leftover_nodes() -> Iterator[None]:
    # (Overrides the suite's per-test cleanup: the nodes here live for the whole module.)
    yield


def cli_json(n: NodeProc, *args: str) -> Any:
    out = n.cli(*args, "--json", timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def test_django_migrate_once_reaches_every_node(rig: Rig) -> None:
    one, two, three = rig.nodes
    rig.django(one, "migrate", "contenttypes", "-v", "0")
    rig.django(one, "migrate", "library", "-v", "0")
    rig.django(one, "shell", "-c", "from library.models import Author, Book; "
               "Book.objects.create(author=Author.objects.create(name='Herbert'), title='Dune')")
    tables = ["django_migrations", "django_content_type", "library_author", "library_book"]
    rig.converged(tables, "the first migration and its rows on every node")
    shown = {n.node_id: rig.django(n, "showmigrations") for n in rig.nodes}
    assert shown[1] == shown[2] == shown[3] and "[X] 0001_initial" in shown[1], shown

    # Node 3 is stopped while the next migration (a table rebuild) runs on node 1.
    three.stop()
    write(rig.app / "library" / "migrations" / "0002_isbn.py", M0002)
    out = rig.django(one, "migrate", "library")
    assert "Applying library.0002_isbn... OK" in out, out
    rig.django(one, "shell", "-c", "from library.models import Author, Book; "
               "Book.objects.create(author=Author.objects.get(), title='Emma', isbn='978')")
    rig.django(two, "shell", "-c", "from library.models import Author; "
               "Author.objects.create(name='Austen')")
    rig.converged(tables, "the rebuild on the running nodes", [one, two])
    three.start()
    rig.converged(tables, "the stopped node caught up with the rebuild and the rows after it")
    assert sorted(three.query("SELECT title, isbn FROM library_book")) == [
        ("Dune", ""), ("Emma", "978")]
    assert "No migrations to apply" in rig.django(two, "migrate", "library")
    shown = {n.node_id: rig.django(n, "showmigrations", "library") for n in rig.nodes}
    assert shown[1] == shown[2] == shown[3] and "[X] 0002_isbn" in shown[1], shown
    # Writes under the new schema are captured on a node that received it.
    three.execute("INSERT INTO library_book(title, isbn, author_id) VALUES ('Persuasion', "
                  "'979', (SELECT id FROM library_author WHERE name = 'Austen'))")
    rig.converged(tables, "a write on the rebuilt table of the node that caught up")
    view = cli_json(two, "schema", "status", "--cluster")["nodes"]
    hashes = {v["schema"]["hash"] for v in view.values()}
    assert len(view) == 3 and len(hashes) == 1, view


def test_alembic_upgrade_once(rig: Rig) -> None:
    two = rig.nodes[1]
    rig.run(two, sys.executable, "-m", "alembic", "upgrade", "head")
    rig.converged(["shelf", "alembic_version"], "alembic's batch rebuild on every node")
    assert rig.nodes[2].query("SELECT id, title, isbn FROM shelf") == [(1, "Dune", "")]
    assert rig.nodes[0].query("SELECT version_num FROM alembic_version") == [("s1",)]


def test_sqlite_utils_transform(rig: Rig) -> None:
    one, _, three = rig.nodes
    one.execute("CREATE TABLE dogs (id INTEGER PRIMARY KEY, name TEXT, age TEXT)")
    one.execute("INSERT INTO dogs VALUES (1, 'Cleo', '5')")
    rig.converged(["dogs"], "a new table")
    tool = Path(sys.executable).parent / "sqlite-utils"
    rig.run(three, str(tool), "transform", str(three.db), "dogs", "--rename", "name",
            "dog_name", "--type", "age", "integer")
    rig.converged(["dogs"], "sqlite-utils transform on every node")
    assert one.query("SELECT id, dog_name, age, typeof(age) FROM dogs") == [
        (1, "Cleo", 5, "integer")]


def test_concurrent_changes_of_one_table_end_with_one_schema(rig: Rig) -> None:
    one, two, three = rig.nodes
    one.execute("CREATE TABLE race (id INTEGER PRIMARY KEY, a TEXT)")
    one.execute("INSERT INTO race VALUES (1, 'x')")
    rig.converged(["race"], "the table both nodes change")
    # Node 2 changes the table while it does not see node 1's change of it (stopped): its own
    # change reaches the stream after node 1's and loses, everywhere.
    two.stop()
    one.execute("ALTER TABLE race ADD COLUMN from_one TEXT")
    wait_until(lambda: "from_one" in str(schema(three)), 30, "node 1's change on node 3")
    conn = sqlite3.connect(two.db)
    conn.execute("ALTER TABLE race ADD COLUMN from_two TEXT")
    conn.execute("INSERT INTO race (id, a, from_two) VALUES (2, 'written on two', 'lost')")
    conn.commit()
    conn.close()
    two.start()
    rig.converged(["race"], "one schema everywhere")
    assert [c[1] for c in one.query("PRAGMA table_info(race)")] == ["id", "a", "from_one"]
    assert sorted(one.query("SELECT id, a FROM race")) == [(1, "x"), (2, "written on two")]
    lost = [c for c in cli_json(two, "conflicts", "list") if c.get("kind") == "schema_change"]
    assert len(lost) == 1 and lost[0]["objects"] == ["race"], lost
    assert "lost to schema change" in lost[0]["reason"] and "from_two" in str(
        lost[0]["statements"]), lost


def test_a_change_that_cannot_be_replayed_is_refused(rig: Rig) -> None:
    one, two, _ = rig.nodes
    # The application knows a collation harmonylite's SQLite does not.
    conn = sqlite3.connect(one.db)
    conn.create_collation("shelfmark", lambda a, b: (a > b) - (a < b))
    conn.execute("CREATE TABLE marks (id INTEGER PRIMARY KEY, m TEXT COLLATE shelfmark)")
    conn.commit()
    conn.close()
    wait_until(lambda: "not replicated: it cannot be replayed exactly" in one.log_text(), 30,
               "the refusal in node 1's log")
    assert "no such collation sequence: shelfmark" in one.log_text()
    status = cli_json(one, "schema", "status")
    assert status["schema"].get("refused") == 1, status
    assert two.query("SELECT name FROM sqlite_schema WHERE name = 'marks'") == []
