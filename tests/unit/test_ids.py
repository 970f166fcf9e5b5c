"""harmonylite.ids: bit layout, ordering, uniqueness under threads, where the generator id comes
from, and the SQLAlchemy ``default=`` recipe of docs/frameworks.md."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from harmonylite import ids
from harmonylite.ids import EPOCH_MS, IdGenerator, fold_node_id, parse

ENV_KEYS = (ids.ENV_GENERATOR, ids.ENV_NODE_ID, ids.ENV_CONFIG)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    ids._forget_after_fork()  # the process-wide generator is chosen again by each test
    yield
    ids._forget_after_fork()


def test_bit_layout() -> None:
    gen = IdGenerator(0b1010101010, clock_ms=lambda: EPOCH_MS + 5)
    first, second = gen.next_id(), gen.next_id()
    assert first == (5 << 22) | (0b1010101010 << 12)
    assert second == first + 1
    assert parse(second) == ids.IdParts(ms=5, generator=0b1010101010, counter=1)


def test_largest_values_stay_a_positive_signed_int64() -> None:
    gen = IdGenerator(1023, clock_ms=lambda: EPOCH_MS + ids.MAX_TIME)
    value = gen.next_id()
    assert 0 < value <= 2**63 - 1
    assert parse(value).generator == 1023
    late = IdGenerator(1, clock_ms=lambda: EPOCH_MS + ids.MAX_TIME + 1)
    with pytest.raises(OverflowError):
        late.next_id()


def test_time_ordered_and_creation_time_readable() -> None:
    now = datetime.now(UTC)
    a = IdGenerator(7).next_id()
    b = IdGenerator(3).next_id()
    # a different generator later in time: larger id, whatever the generator bits
    assert parse(a).ms <= parse(b).ms
    assert abs((parse(a).created_at - now).total_seconds()) < 5


def test_clock_going_back_never_reissues() -> None:
    times = iter([EPOCH_MS + 100, EPOCH_MS + 100, EPOCH_MS + 40, EPOCH_MS + 40, EPOCH_MS + 101])
    gen = IdGenerator(9, clock_ms=lambda: next(times))
    got = [gen.next_id() for _ in range(5)]
    assert got == sorted(got) and len(set(got)) == 5


def test_counter_overflow_borrows_the_next_millisecond() -> None:
    gen = IdGenerator(2, clock_ms=lambda: EPOCH_MS + 10)
    got = [gen.next_id() for _ in range(4096 * 2 + 3)]
    assert len(set(got)) == len(got) and got == sorted(got)
    assert parse(got[4096]) == ids.IdParts(ms=11, generator=2, counter=0)


def test_unique_and_increasing_per_thread_under_contention() -> None:
    gen = IdGenerator(1)
    per_thread: list[list[int]] = [[] for _ in range(8)]
    barrier = threading.Barrier(8)

    def work(out: list[int]) -> None:
        barrier.wait()
        for _ in range(20_000):
            out.append(gen.next_id())

    threads = [threading.Thread(target=work, args=(out,)) for out in per_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [v for out in per_thread for v in out]
    assert len(set(every)) == len(every) == 160_000
    assert all(out == sorted(out) for out in per_thread)


def test_two_generators_in_the_same_millisecond_do_not_collide() -> None:
    clock = lambda: EPOCH_MS + 77  # noqa: E731
    a, b = IdGenerator(1, clock_ms=clock), IdGenerator(2, clock_ms=clock)
    assert not {a.next_id() for _ in range(3000)} & {b.next_id() for _ in range(3000)}


def test_fold_node_id() -> None:
    assert [fold_node_id(n) for n in (0, 1, 2, 1023)] == [0, 1, 2, 1023]
    big = 0xCBF29CE484222325
    assert 0 <= fold_node_id(big) <= 1023
    assert fold_node_id(big) == fold_node_id(big)
    with pytest.raises(ValueError):
        fold_node_id(2**64)


def test_generator_id_sources_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LookupError, match="HARMONYLITE_ID_GENERATOR"):
        ids.generator_id()
    config = tmp_path / "config.toml"
    config.write_text('db_path = "x.db"\nnode_id = 5\n[snapshot]\nenabled = false\n')
    monkeypatch.setenv(ids.ENV_CONFIG, str(config))
    assert ids.generator_id() == 5
    monkeypatch.setenv(ids.ENV_NODE_ID, "1030")
    assert ids.generator_id() == fold_node_id(1030)
    monkeypatch.setenv(ids.ENV_GENERATOR, "12")
    assert ids.generator_id() == 12
    monkeypatch.setenv(ids.ENV_GENERATOR, "1024")
    with pytest.raises(ValueError, match="between 0 and 1023"):
        ids.generator_id()


def test_next_id_uses_the_configured_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ids.ENV_NODE_ID, "3")
    assert parse(ids.next_id()).generator == 3
    ids.configure(44)
    assert parse(ids.next_id()).generator == 44


def test_forked_child_does_not_continue_the_parents_generator(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ids.configure(8)
    ids.next_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its inherited generator must be gone
        os.write(write, b"1" if ids._default is None else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    os.close(read)
    os.close(write)


def test_sqlalchemy_default_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    class Base(DeclarativeBase):
        pass

    class Event(Base):
        __tablename__ = "events"
        # the recipe of docs/frameworks.md: INTEGER on SQLite, so the id is the rowid
        id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                                        primary_key=True, default=ids.next_id,
                                        autoincrement=False)
        what: Mapped[str]

    monkeypatch.setenv(ids.ENV_GENERATOR, "17")
    engine = sa.create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([Event(what=str(i)) for i in range(50)])
        session.commit()
        got = session.scalars(sa.select(Event.id).order_by(Event.what)).all()
    assert len(set(got)) == 50 and all(parse(v).generator == 17 for v in got)
    ddl = str(sa.schema.CreateTable(Event.__table__).compile(engine))  # type: ignore[arg-type]
    assert "id INTEGER NOT NULL" in ddl


def test_django_default_auto_field(tmp_path: Path) -> None:
    """DEFAULT_AUTO_FIELD = SnowflakeAutoField passes Django's checks, makes an INTEGER primary
    key on SQLite, and fills it on create(), save() and bulk_create(). In a subprocess: Django's
    settings are process-wide."""
    pytest.importorskip("django")
    app = tmp_path / "shop"
    app.mkdir()
    (app / "__init__.py").write_text("")
    (app / "models.py").write_text(
        "from django.db import models\n"
        "class Item(models.Model):\n"
        "    name = models.CharField(max_length=20)\n")
    script = tmp_path / "run.py"
    script.write_text(
        "import django\n"
        "from django.conf import settings\n"
        "settings.configure(INSTALLED_APPS=['shop'], DEFAULT_AUTO_FIELD="
        "'harmonylite.contrib.django.SnowflakeAutoField',\n"
        "    DATABASES={'default': {'ENGINE': 'django.db.backends.sqlite3', 'NAME': ':memory:'}})\n"
        "django.setup()\n"
        "from django.core import checks\n"
        "from django.db import connection\n"
        "from shop.models import Item\n"
        "assert not checks.run_checks(), checks.run_checks()\n"
        "with connection.schema_editor() as editor:\n"
        "    editor.create_model(Item)\n"
        "a = Item.objects.create(name='a')\n"
        "b = Item(name='b'); assert b.pk is None; b.save()\n"
        "c, d = Item.objects.bulk_create([Item(name='c'), Item(name='d')])\n"
        "print(a.pk, b.pk, c.pk, d.pk)\n"
        "print(Item.objects.count())\n"
        "with connection.cursor() as cur:\n"
        "    cur.execute(\"SELECT sql FROM sqlite_master WHERE name = 'shop_item'\")\n"
        "    print(cur.fetchone()[0])\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), ids.ENV_GENERATOR: "21"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    pks_line, count, ddl = out.stdout.splitlines()
    pks = [int(v) for v in pks_line.split()]
    assert count == "4" and len(set(pks)) == 4 and pks == sorted(pks)
    assert all(parse(v).generator == 21 for v in pks)
    assert '"id" integer NOT NULL PRIMARY KEY' in ddl
