"""Real applications on two real nodes: Django (``manage.py migrate`` node by node while both run,
a new cluster, ORM writes at the same moment on both nodes, sessions, cluster-unique ids) and
Alembic with SQLAlchemy. Every claim of docs/frameworks.md is checked here.

One Django project and one Alembic environment are written once per module (settings, apps and
migration files written by hand, as a project ships them); each test gets its own nodes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from harmonylite.config import parse_config
from harmonylite.ids import parse
from nodes import NodeProc, wait_until
from servers import NatsServer

pytest.importorskip("django")
pytest.importorskip("alembic")

SETTINGS = """
import os

SECRET_KEY = "not-secret"
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth",
                  "django.contrib.sessions", "library", "guestbook"]
# Django opens DEFERRED transactions by default; one that read and then writes while the
# replicator committed fails at once with "database is locked" instead of waiting (SQLite cannot
# upgrade a stale read snapshot). IMMEDIATE takes the write lock first and waits for it.
_OPTIONS = {"timeout": 20, "transaction_mode": "IMMEDIATE"}
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.environ["APP_DB"],
                         "OPTIONS": _OPTIONS}}
if os.environ.get("APP_DB2"):  # a second node's database, for writes at the same instant
    DATABASES["other"] = {**DATABASES["default"], "NAME": os.environ["APP_DB2"]}
DEFAULT_AUTO_FIELD = "harmonylite.contrib.django.SnowflakeAutoField"
"""

LIBRARY_APPS = """
from django.apps import AppConfig


class LibraryConfig(AppConfig):
    name = "library"
    # Django's usual auto-increment keys: the case the guide warns about
    default_auto_field = "django.db.models.BigAutoField"
"""

# LIBRARY_VERSION=1 is the code before the deploy (a node not upgraded yet), 2 after it.
LIBRARY_MODELS = """
import os

from django.db import models

V2 = os.environ.get("LIBRARY_VERSION", "2") == "2"


class Author(models.Model):
    name = models.CharField(max_length=100)


class Book(models.Model):
    author = models.ForeignKey(Author, on_delete=models.CASCADE)
    title = models.CharField(max_length=200 if V2 else 100)
    if V2:
        isbn = models.CharField(max_length=20, default="")


if V2:
    class Publisher(models.Model):
        name = models.CharField(max_length=100, unique=True)
"""

BIG_ID = ('("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, '
          'verbose_name="ID"))')

LIBRARY_0001 = f"""
import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies = []
    operations = [
        migrations.CreateModel(name="Author", fields=[
            {BIG_ID}, ("name", models.CharField(max_length=100))]),
        migrations.CreateModel(name="Book", fields=[
            {BIG_ID}, ("title", models.CharField(max_length=100)),
            ("author", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE,
                                         to="library.author"))]),
    ]
"""

# A new model, a NOT NULL column with a Python default and a changed max_length: on SQLite,
# Django rebuilds library_book (create new, copy, drop, rename) for the last two.
LIBRARY_0002 = f"""
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("library", "0001_initial")]
    operations = [
        migrations.CreateModel(name="Publisher", fields=[
            {BIG_ID}, ("name", models.CharField(max_length=100, unique=True))]),
        migrations.AddField(model_name="book", name="isbn",
                            field=models.CharField(default="", max_length=20)),
        migrations.AlterField(model_name="book", name="title",
                              field=models.CharField(max_length=200)),
    ]
"""

GUESTBOOK_MODELS = """
from django.db import models


class Entry(models.Model):  # its key is DEFAULT_AUTO_FIELD: SnowflakeAutoField
    node = models.IntegerField()
    n = models.IntegerField()
"""

GUESTBOOK_0001 = """
import harmonylite.contrib.django
from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies = []
    operations = [
        migrations.CreateModel(name="Entry", fields=[
            ("id", harmonylite.contrib.django.SnowflakeAutoField(
                auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
            ("node", models.IntegerField()), ("n", models.IntegerField())]),
    ]
"""

ALEMBIC_ENV = """
import os

from alembic import context
from sqlalchemy import create_engine

engine = create_engine("sqlite:///" + os.environ["APP_DB"],
                       connect_args={"timeout": 20})
with engine.connect() as connection:
    # batch mode: SQLite cannot ALTER a column, Alembic rebuilds the table instead
    context.configure(connection=connection, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
"""

ALEMBIC_A1 = """
import sqlalchemy as sa
from alembic import op

revision = "a1"
down_revision = None


def upgrade():
    op.create_table("shelf_author", sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("name", sa.String(100), nullable=False))
    op.create_table("shelf_book", sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("author_id", sa.Integer, sa.ForeignKey("shelf_author.id")),
                    sa.Column("title", sa.String(100), nullable=False))
"""

ALEMBIC_A2 = """
import sqlalchemy as sa
from alembic import op

revision = "a2"
down_revision = "a1"


def upgrade():
    op.create_table("shelf_publisher", sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("name", sa.String(100), nullable=False, unique=True))
    with op.batch_alter_table("shelf_book", recreate="always") as batch:
        batch.add_column(sa.Column("isbn", sa.String(20), nullable=False, server_default=""))
        batch.alter_column("title", type_=sa.String(200))
"""

LIBRARY_TABLES = ["library_author", "library_book", "library_publisher", "guestbook_entry"]
FRAMEWORK_ROWS = ["django_content_type", "auth_permission"]
SHELF_TABLES = ["shelf_author", "shelf_book", "shelf_publisher"]


@dataclass
class Project:
    dir: Path
    v1_db: Path  # contrib apps migrated, library at 0001 (the code before the deploy)
    v2_db: Path  # everything migrated


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())


def django(project: Path, db: Path, *args: str, version: int = 2,
           node: NodeProc | None = None, env: dict[str, str] | None = None,
           check: bool = True) -> str:
    """``python -m django ARGS`` (what ``manage.py`` runs) for the application of one node."""
    full_env = {**os.environ, "PYTHONPATH": str(project), "DJANGO_SETTINGS_MODULE":
                "site_settings", "APP_DB": str(db), "LIBRARY_VERSION": str(version),
                **(env or {})}
    if node is not None:  # the application sits beside its node: ids from the node's id
        full_env["HARMONYLITE_CONFIG"] = str(node.config_path)
    else:
        # Preparing a database before any node runs: with DEFAULT_AUTO_FIELD set, even
        # django_migrations takes its ids from the generator, which needs an identity.
        full_env.setdefault("HARMONYLITE_ID_GENERATOR", "0")
    out = subprocess.run([sys.executable, "-m", "django", *args], capture_output=True,
                         text=True, env=full_env, timeout=120)
    if check:
        assert out.returncode == 0, f"django {args} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def orm(project: Path, node: NodeProc, code: str, version: int = 2,
        env: dict[str, str] | None = None) -> str:
    """Run ORM code for ``node``'s application (``manage.py shell -c``)."""
    return django(project, node.db, "shell", "-v", "0", "-c", textwrap.dedent(code),
                  version=version, node=node, env=env)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    root = tmp_path_factory.mktemp("django-project")
    write(root / "site_settings.py", SETTINGS)
    write(root / "library" / "__init__.py", "")
    write(root / "library" / "apps.py", LIBRARY_APPS)
    write(root / "library" / "models.py", LIBRARY_MODELS)
    write(root / "library" / "migrations" / "__init__.py", "")
    write(root / "library" / "migrations" / "0001_initial.py", LIBRARY_0001)
    write(root / "library" / "migrations" / "0002_publisher_isbn.py", LIBRARY_0002)
    write(root / "guestbook" / "__init__.py", "")
    write(root / "guestbook" / "models.py", GUESTBOOK_MODELS)
    write(root / "guestbook" / "migrations" / "__init__.py", "")
    write(root / "guestbook" / "migrations" / "0001_initial.py", GUESTBOOK_0001)
    write(root / "alembic.ini", "[alembic]\nscript_location = %(here)s/shelf\n")
    write(root / "shelf" / "env.py", ALEMBIC_ENV)
    write(root / "shelf" / "versions" / "a1.py", ALEMBIC_A1)
    write(root / "shelf" / "versions" / "a2.py", ALEMBIC_A2)
    v1 = root / "v1.db"
    # The hand-written migrations match the models, and SnowflakeAutoField deconstructs into
    # them (nothing for makemigrations to add).
    django(root, v1, "makemigrations", "--check", "--dry-run")
    django(root, v1, "shell", "-c", textwrap.dedent("""
        from django.core.management import call_command
        call_command("migrate", "library", "0001", verbosity=0)
        for app in ("contenttypes", "auth", "sessions", "guestbook"):
            call_command("migrate", app, verbosity=0)
        """), version=1)
    v2 = root / "v2.db"
    shutil.copy(v1, v2)
    django(root, v2, "migrate", "--verbosity", "0")
    return Project(root, v1, v2)


@pytest.fixture
def start_pair(tmp_path: Path, nats_server: NatsServer
               ) -> Iterator[Callable[[Path | None], tuple[NodeProc, NodeProc]]]:
    started: list[NodeProc] = []

    def start(template: Path | None) -> tuple[NodeProc, NodeProc]:
        for i in (1, 2):
            n = NodeProc(tmp_path / f"node{i}", i, {"nats": {"urls": [nats_server.url]}})
            if template is not None:
                shutil.copy(template, n.db)
            else:  # a new cluster: the nodes run on empty databases
                n.execute("PRAGMA user_version = 0")
            started.append(n)
        for n in started:
            n.start_async()
        for n in started:
            n.wait_started()
        return started[0], started[1]

    yield start
    for n in started:
        n.stop()


def table_names(n: NodeProc) -> set[str]:
    return {r[0] for r in n.query("SELECT name FROM sqlite_master WHERE type = 'table'")}


def dump(n: NodeProc, table: str) -> list[tuple[Any, ...]]:
    cols = [c[1] for c in n.query(f'PRAGMA table_info("{table}")')]
    if not cols:
        return [("missing table", table)]
    exprs = ", ".join(f'typeof("{c}"), quote("{c}")' for c in cols)
    return sorted(n.query(f'SELECT {exprs} FROM "{table}"'), key=repr)


def settled(a: NodeProc, b: NodeProc, tables: list[str]) -> Callable[[], bool]:
    """Nothing waiting to be published, nothing parked, and the tables equal on both nodes."""
    def check() -> bool:
        for n in (a, b):
            left = n.query("SELECT (SELECT count(*) FROM __harmonylite__log WHERE id > "
                           "(SELECT v FROM __harmonylite__state WHERE k = 'published')), "
                           "(SELECT count(*) FROM __harmonylite__parked)")[0]
            if left != (0, 0):
                return False
        return all(dump(a, t) == dump(b, t) for t in tables)
    return check


def wait_settled(a: NodeProc, b: NodeProc, tables: list[str], what: str) -> None:
    try:
        wait_until(settled(a, b, tables), 30, what)
    except AssertionError:
        diff = {t: (dump(a, t), dump(b, t)) for t in tables if dump(a, t) != dump(b, t)}
        raise AssertionError(f"{what}: tables differ {diff}\nnode 1:\n"
                             f"{a.log_text()[-2500:]}\nnode 2:\n{b.log_text()[-2500:]}") from None


def cli_json(n: NodeProc, *args: str) -> Any:
    out = subprocess.run([sys.executable, "-m", "harmonylite", "-config", str(n.config_path),
                          *args, "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def no_dead_letters(*nodes: NodeProc) -> None:
    for n in nodes:
        assert cli_json(n, "dead-letters", "list") == [], f"dead letters on node {n.node_id}"


def framework_rows_converged(a: NodeProc, b: NodeProc) -> None:
    """Item 2: content types and permissions, created by every node's migrate, are the same rows
    on both nodes, once each."""
    for table in FRAMEWORK_ROWS:
        assert dump(a, table) == dump(b, table)
    models = a.query("SELECT app_label, model FROM django_content_type")
    assert len(models) == len(set(models))
    assert ("library", "publisher") in models and ("guestbook", "entry") in models
    codenames = a.query("SELECT content_type_id, codename FROM auth_permission")
    assert len(codenames) == len(set(codenames)) == 4 * len(models)


def showmigrations_all_applied(project: Project, n: NodeProc) -> None:
    shown = django(project.dir, n.db, "showmigrations", "library", "guestbook")
    assert "[ ]" not in shown and " [X] 0002_publisher_isbn" in shown, shown


def test_every_frameworks_bookkeeping_table_is_per_node_by_default() -> None:
    cfg, _ = parse_config({"db_path": "x.db"})
    bookkeeping = ["django_migrations", "alembic_version", "schema_migrations",
                   "ar_internal_metadata", "knex_migrations", "knex_migrations_lock",
                   "flyway_schema_history", "goose_db_version", "__EFMigrationsHistory",
                   "_prisma_migrations"]
    assert not any(cfg.replicates_table(t) for t in bookkeeping)
    assert cfg.replicates_table("library_book")
    # a list of one's own replaces the defaults: docs/frameworks.md says to keep them in it
    mine, _ = parse_config({"db_path": "x.db", "exclude_tables": ["audit_*"]})
    assert not mine.replicates_table("audit_2024") and mine.replicates_table("django_migrations")


def test_django_rolling_migrate_while_both_nodes_run(
        project: Project, start_pair: Callable[[Path | None], tuple[NodeProc, NodeProc]]
) -> None:
    a, b = start_pair(project.v1_db)
    for n in (a, b):  # the bookkeeping table gets no capture (exclude_tables' default)
        assert n.query("SELECT name FROM sqlite_master WHERE type = 'trigger' AND "
                       "tbl_name = 'django_migrations'") == []
    orm(project.dir, a, """
        from library.models import Author, Book
        Book.objects.create(author=Author.objects.create(name="Herbert"), title="Dune")
        """, version=1)
    wait_settled(a, b, LIBRARY_TABLES[:2], "the first rows")

    # node 1 is deployed first: its migrate rebuilds library_book and adds a model
    out = django(project.dir, a.db, "migrate", node=a)
    assert "Applying library.0002_publisher_isbn... OK" in out, out
    orm(project.dir, a, """
        from library.models import Author, Publisher
        Publisher.objects.create(name="Ace")
        Author.objects.filter(name="Herbert").update(name="Frank Herbert")
        """)
    # node 2 still runs the old code, and writes with it (a table the migration left alone)
    orm(project.dir, b, """
        from library.models import Author
        Author.objects.create(name="Austen")
        """, version=1)
    # node 1's migration is not node 2's: its bookkeeping row did not replicate
    wait_until(lambda: b.query("SELECT count(*) FROM __harmonylite__parked")[0][0] > 0, 20,
               "node 1's new-schema changes waiting on node 2")
    assert "[ ] 0002_publisher_isbn" in django(project.dir, b.db, "showmigrations", "library")
    assert "isbn" not in [c[1] for c in b.query("PRAGMA table_info(library_book)")]

    out = django(project.dir, b.db, "migrate", node=b)
    assert "Applying library.0002_publisher_isbn... OK" in out, out
    wait_settled(a, b, LIBRARY_TABLES + FRAMEWORK_ROWS, "both nodes migrated")
    assert b.query("SELECT title, isbn FROM library_book") == [("Dune", "")]
    assert b.query("SELECT name FROM library_publisher") == [("Ace",)]
    assert sorted(a.query("SELECT name FROM library_author")) == [("Austen",),
                                                                   ("Frank Herbert",)]
    # writes after the rebuild are captured on both nodes
    orm(project.dir, b, """
        from library.models import Author, Book
        Book.objects.create(author=Author.objects.get(name="Austen"), title="Emma",
                            isbn="978-0141")
        """)
    orm(project.dir, a, """
        from library.models import Book
        Book.objects.filter(title="Dune").update(title="Dune (1965)", isbn="978-0441")
        """)
    wait_settled(a, b, LIBRARY_TABLES + FRAMEWORK_ROWS, "writes after both migrations")
    assert sorted(b.query("SELECT title, isbn FROM library_book")) == [
        ("Dune (1965)", "978-0441"), ("Emma", "978-0141")]
    for n in (a, b):
        showmigrations_all_applied(project, n)
        assert n.query("SELECT count(*) FROM django_migrations WHERE app = 'library' AND "
                       "name = '0002_publisher_isbn'") == [(1,)]
    framework_rows_converged(a, b)
    no_dead_letters(a, b)


def test_django_write_to_a_rebuilt_table_before_the_last_node_migrates(
        project: Project, start_pair: Callable[[Path | None], tuple[NodeProc, NodeProc]]
) -> None:
    a, b = start_pair(project.v1_db)
    orm(project.dir, a, """
        from library.models import Author, Book
        Book.objects.create(author=Author.objects.create(name="Herbert"), title="Dune")
        """, version=1)
    wait_settled(a, b, LIBRARY_TABLES[:2], "the first rows")
    django(project.dir, a.db, "migrate", node=a)
    orm(project.dir, a, """
        from library.models import Book
        Book.objects.filter(title="Dune").update(isbn="978-0441")
        """)
    wait_until(lambda: b.query("SELECT count(*) FROM __harmonylite__parked")[0][0] > 0, 20,
               "node 1's update waiting on node 2")
    django(project.dir, b.db, "migrate", node=b)
    wait_settled(a, b, LIBRARY_TABLES, "both nodes migrated")
    assert a.query("SELECT isbn FROM library_book") == [("978-0441",)]


def test_django_new_cluster_migrated_node_by_node(
        project: Project, start_pair: Callable[[Path | None], tuple[NodeProc, NodeProc]]
) -> None:
    a, b = start_pair(None)
    out = django(project.dir, a.db, "migrate", node=a)
    assert "Applying library.0002_publisher_isbn... OK" in out, out
    session_key = orm(project.dir, a, """
        from django.contrib.sessions.backends.db import SessionStore
        from library.models import Author, Book
        from guestbook.models import Entry
        Book.objects.create(author=Author.objects.create(name="Le Guin"), title="Earthsea")
        Entry.objects.create(node=1, n=0)
        session = SessionStore()
        session["cart"] = ["Earthsea"]
        session.create()
        print(session.session_key)
        """).strip()
    # node 2 has none of these tables yet: the rows wait for its own migrate, which applies every
    # migration (node 1's django_migrations rows are node 1's)
    wait_until(lambda: b.query("SELECT count(*) FROM __harmonylite__parked")[0][0] > 0, 20,
               "node 1's rows waiting on node 2")
    # Node 1's content types and permissions, waiting on node 2, land in its new tables only
    # once its schema has settled: Django's post_migrate creating the same rows meanwhile must
    # not meet them half-way (a UNIQUE error would stop migrate).
    out = django(project.dir, b.db, "migrate", node=b)
    assert "Applying library.0002_publisher_isbn... OK" in out, out
    assert "Applying contenttypes.0001_initial... OK" in out, out
    tables = LIBRARY_TABLES + FRAMEWORK_ROWS + ["django_session"]
    wait_settled(a, b, tables, "node 2 migrated")
    # a login made on node 1 is valid on node 2
    loaded = orm(project.dir, b, f"""
        from django.contrib.sessions.backends.db import SessionStore
        print(SessionStore(session_key={session_key!r}).load()["cart"])
        """)
    assert loaded.strip() == "['Earthsea']"
    orm(project.dir, b, """
        from library.models import Author, Book, Publisher
        Publisher.objects.create(name="Ace")
        Book.objects.create(author=Author.objects.get(name="Le Guin"), title="Tehanu",
                            isbn="978-0689")
        """)
    wait_settled(a, b, tables, "node 2's writes")
    assert a.query("SELECT count(*) FROM library_book") == [(2,)]
    for n in (a, b):
        showmigrations_all_applied(project, n)
    framework_rows_converged(a, b)
    no_dead_letters(a, b)


def test_django_concurrent_inserts_lose_nothing_silently(
        project: Project, start_pair: Callable[[Path | None], tuple[NodeProc, NodeProc]]
) -> None:
    a, b = start_pair(project.v2_db)
    # The same instant on both nodes (two threads, one per node's database): Django's
    # auto-increment picks the same next id on each. Each thread holds its database's write
    # lock (an UPDATE that matches nothing) before the two meet, so neither node can apply the
    # other's row first, however quickly it arrives.
    out = orm(project.dir, a, """
        import json, threading
        from django.db import transaction
        from library.models import Author, Book
        barrier = threading.Barrier(2)
        made = {}
        def create(alias, name):
            with transaction.atomic(using=alias):
                Author.objects.using(alias).filter(pk=-1).update(name=name)
                barrier.wait()
                author = Author.objects.using(alias).create(name=name)
                book = Book.objects.using(alias).create(author=author, title=name + "'s book")
            made[alias] = [author.pk, book.pk]
        threads = [threading.Thread(target=create, args=args)
                   for args in (("default", "Ann on node 1"), ("other", "Bob on node 2"))]
        for t in threads: t.start()
        for t in threads: t.join()
        print(json.dumps(made))
        """, env={"APP_DB2": str(b.db)})
    made = json.loads(out)
    assert made["default"] == made["other"], made  # the collision this test is about
    tables = LIBRARY_TABLES[:2]
    wait_settled(a, b, tables, "converged after the collision")
    listed = [c for n in (a, b) for c in cli_json(n, "conflicts", "list")]
    recorded = {(c["table"], c["displaced"].get("name") or c["displaced"].get("title"),
                 c["winning_origin"]) for c in listed}
    # Each table keeps one of the two rows (each row is decided on its own: the author kept
    # may be one node's and the book the other's); the row that lost is where an operator finds
    # it: conflicts list on the node that held it names it with the winning origin.
    for table, column, suffix in (("library_author", "name", ""),
                                  ("library_book", "title", "'s book")):
        kept = a.query(f"SELECT {column} FROM {table}")
        assert len(kept) == 1, (table, kept)
        kept_name = kept[0][0]
        names = {"Ann on node 1" + suffix, "Bob on node 2" + suffix}
        assert kept_name in names
        lost_name = (names - {kept_name}).pop()
        winner = 1 if "node 1" in kept_name else 2
        assert (table, lost_name, winner) in recorded, listed
    no_dead_letters(a, b)


def test_snowflake_ids_from_two_nodes_never_collide(
        project: Project, start_pair: Callable[[Path | None], tuple[NodeProc, NodeProc]],
        tmp_path: Path) -> None:
    a, b = start_pair(project.v2_db)
    go = tmp_path / "go"
    code = f"""
        import os, pathlib
        from guestbook.models import Entry
        go = pathlib.Path({str(go)!r})
        while not go.exists():  # start together with the other node's application
            pass
        node = int(os.environ["NODE"])
        for i in range(150):
            Entry.objects.create(node=node, n=i)
        Entry.objects.bulk_create([Entry(node=node, n=150 + i) for i in range(150)])
        """
    procs = []
    for n in (a, b):
        env = {**os.environ, "PYTHONPATH": str(project.dir), "DJANGO_SETTINGS_MODULE":
               "site_settings", "APP_DB": str(n.db), "HARMONYLITE_CONFIG": str(n.config_path),
               "NODE": str(n.node_id)}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "django", "shell", "-c", textwrap.dedent(code)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    wait_settled(a, b, ["guestbook_entry"], "both nodes' entries")
    got = a.query("SELECT id, node FROM guestbook_entry")
    assert len(got) == 600  # 300 from each node: none displaced another
    assert all(parse(i).generator == node for i, node in got)  # node 1 -> generator 1, …
    assert cli_json(a, "conflicts", "list") == [] and cli_json(b, "conflicts", "list") == []
    no_dead_letters(a, b)


def alembic(project: Project, n: NodeProc, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "alembic", "-c",
                          str(project.dir / "alembic.ini"), *args],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "APP_DB": str(n.db)})
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def test_alembic_rolling_upgrade_while_both_nodes_run(
        project: Project, start_pair: Callable[[Path | None], tuple[NodeProc, NodeProc]]
) -> None:
    a, b = start_pair(None)
    engines = {n.node_id: sa.create_engine(f"sqlite:///{n.db}", connect_args={"timeout": 20})
               for n in (a, b)}
    meta = sa.MetaData()

    def write(n: NodeProc, sql: str, **params: Any) -> None:
        with engines[n.node_id].begin() as conn:
            conn.execute(sa.text(sql), params)

    try:
        for n in (a, b):  # a new cluster: each node upgrades on its own
            alembic(project, n, "upgrade", "a1")
        write(a, "INSERT INTO shelf_author(id, name) VALUES (1, 'Herbert')")
        write(a, "INSERT INTO shelf_book(id, author_id, title) VALUES (1, 1, 'Dune')")
        wait_settled(a, b, SHELF_TABLES[:2], "rows at revision a1")

        alembic(project, a, "upgrade", "head")  # batch mode rebuilds shelf_book
        write(a, "INSERT INTO shelf_publisher(id, name) VALUES (1, 'Ace')")
        # node 2 still runs the old code: its rows lack the new NOT NULL column, which node 1
        # fills from the server_default
        write(b, "INSERT INTO shelf_author(id, name) VALUES (2, 'Austen')")
        write(b, "INSERT INTO shelf_book(id, author_id, title) VALUES (4, 2, 'Persuasion')")
        wait_until(lambda: a.query("SELECT title, isbn FROM shelf_book WHERE id = 4")
                   == [("Persuasion", "")], 20, "node 2's old-schema row on node 1")
        assert "a1" in alembic(project, b, "current")  # alembic_version stays per node
        alembic(project, b, "upgrade", "head")
        assert "a2 (head)" in alembic(project, b, "current")
        assert "a2 (head)" in alembic(project, a, "current")
        wait_settled(a, b, SHELF_TABLES, "both nodes upgraded")
        book = sa.Table("shelf_book", meta, autoload_with=engines[1])
        with engines[1].begin() as conn:  # SQLAlchemy Core on the new schema
            conn.execute(sa.insert(book).values(id=2, author_id=1, title="Dune Messiah",
                                                isbn="978-0399"))
            conn.execute(sa.update(book).where(book.c.id == 1).values(isbn="978-0441"))
        write(b, "INSERT INTO shelf_book(id, author_id, title) VALUES (3, 2, 'Emma')")
        wait_settled(a, b, SHELF_TABLES, "writes after both upgrades")
        assert sorted(b.query("SELECT id, title, isbn FROM shelf_book")) == [
            (1, "Dune", "978-0441"), (2, "Dune Messiah", "978-0399"), (3, "Emma", ""),
            (4, "Persuasion", "")]
        assert b.query("SELECT name FROM shelf_publisher") == [("Ace",)]
        for n in (a, b):
            assert n.query("SELECT version_num FROM alembic_version") == [("a2",)]
        no_dead_letters(a, b)
    finally:
        for engine in engines.values():
            engine.dispose()
