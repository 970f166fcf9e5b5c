"""The sealing store wrapper and age keys, on a real directory store."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path

import pyrage
import pytest

from harmonylite.age_keys import Keys, check_recipients, load_identities, load_keys, new_identity
from harmonylite.cli.main import main
from harmonylite.config import parse_config
from harmonylite.errors import ConfigError, ObjectNotFound, SealedObjectDamaged, SealError
from harmonylite.snapshot.manifest import Manifest, new_snapshot_id, rfc3339
from harmonylite.snapshot.sealing import opened, seal_manifest
from harmonylite.storage.file import FileStore
from harmonylite.storage.sealed import MAGIC, SealedStore, _seal_file, _Writer, seal_key

KEY = "snapshots/p000000000000001-20240101T000000Z-1-0a0b0c0d.db.zst"


def identity_file(path: Path, *secrets: str) -> Path:
    lines = ["# created by the test"]
    for s in secrets:
        lines += ["# public key: (not needed)", s]
    path.write_text("\n".join(lines) + "\n")
    return path


def sealed_store(root: Path, recipients: list[str], idfile: Path | None = None) -> SealedStore:
    return SealedStore(FileStore(root), load_keys(recipients, str(idfile) if idfile else ""))


def payload(path: Path, size: int = 3 * 1024 * 1024 + 17) -> Path:
    path.write_bytes(os.urandom(size))
    return path


# -- keys -------------------------------------------------------------------------------------

def test_bad_recipient_is_a_config_error_naming_the_key() -> None:
    _, good = new_identity()
    with pytest.raises(ConfigError) as err:
        parse_config({"snapshot": {"encryption": {"recipients": [good, "age1notakey"]}}})
    assert err.value.key == "snapshot.encryption.recipients"
    assert "entry 2" in str(err.value) and "age1notakey" in str(err.value)
    with pytest.raises(ConfigError, match="must start with age1"):
        check_recipients(["ssh-ed25519 AAAA"])
    with pytest.raises(ConfigError, match="array of strings"):
        parse_config({"snapshot": {"encryption": {"recipients": "age1x"}}})


def test_a_secret_key_listed_as_recipient_is_refused_without_showing_it() -> None:
    secret, public = new_identity()
    with pytest.raises(ConfigError) as err:
        check_recipients([public, secret])
    assert secret not in str(err.value) and "secret identity" in str(err.value)
    assert check_recipients([public, f" {public} "]) == (public,)  # duplicates dropped


def test_identity_file_errors_name_the_file_and_line(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    secret, public = new_identity()
    good = identity_file(tmp_path / "ok.txt", secret)
    good.chmod(0o600)
    assert len(load_identities(str(good))) == 1
    assert "chmod 600" not in caplog.text
    good.chmod(0o644)
    load_identities(str(good))
    assert "can be read by other users (mode 644)" in caplog.text and secret not in caplog.text
    with pytest.raises(ConfigError, match="cannot be read"):
        load_identities(str(tmp_path / "missing.txt"))
    (tmp_path / "pub.txt").write_text(f"{secret}\n{public}\n")
    with pytest.raises(ConfigError, match="line 2 is a public key") as err:
        load_identities(str(tmp_path / "pub.txt"))
    assert secret not in str(err.value)
    (tmp_path / "junk.txt").write_text("# nothing\nAGE-SECRET-KEY-1NOPE\n")
    with pytest.raises(ConfigError, match="line 2 is not an age X25519 identity") as err:
        load_identities(str(tmp_path / "junk.txt"))
    assert err.value.key == "snapshot.encryption.identity_file"
    (tmp_path / "empty.txt").write_text("# only comments\n\n")
    with pytest.raises(ConfigError, match="holds no identity"):
        load_identities(str(tmp_path / "empty.txt"))


def test_a_missing_identity_file_stops_any_command_with_exit_2(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]
                                                               ) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'''db_path = "{tmp_path / 'x.db'}"
[snapshot]
store = "file"
[snapshot.file]
path = "{tmp_path / 'store'}"
[snapshot.encryption]
identity_file = "{tmp_path / 'nowhere.txt'}"
''')
    with pytest.raises(ConfigError, match="cannot be read"):  # at start, not at a first restore
        parse_config({"snapshot": {"encryption": {"identity_file": str(tmp_path / "no.txt")}}})
    assert main(["-config", str(config), "snapshot", "list"]) == 2
    err = capsys.readouterr().err
    assert "snapshot.encryption.identity_file" in err and "nowhere.txt" in err


# -- sealing and opening ----------------------------------------------------------------------

async def test_file_round_trip_is_sealed_at_rest(tmp_path: Path) -> None:
    secret, public = new_identity()
    store = sealed_store(tmp_path / "store", [public], identity_file(tmp_path / "id", secret))
    src = payload(tmp_path / "src")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()

    up = await store.upload(KEY, src)
    assert (up.size, up.sha256) == (src.stat().st_size, digest)  # the plaintext, as packed
    raw = (tmp_path / "store" / KEY).read_bytes()
    assert raw.startswith(MAGIC) and src.read_bytes()[:4096] not in raw
    record = json.loads((tmp_path / "store" / seal_key(KEY)).read_text())
    assert record["recipients"] == [public] and record["scheme"] == "age-x25519"
    assert record["sealed_bytes"] == len(raw) and record["plain_bytes"] == up.size
    assert secret not in (tmp_path / "store" / seal_key(KEY)).read_text()

    st = await store.stat(KEY)
    assert (st.size, st.sha256) == (up.size, digest)
    assert [i.key for i in await store.list("snapshots/")] == [KEY]  # the record is hidden

    out = tmp_path / "out"
    down = await store.download(KEY, out)
    assert out.read_bytes() == src.read_bytes()
    assert (down.size, down.sha256) == (up.size, digest)
    assert sorted(os.listdir(tmp_path)) == ["id", "out", "src", "store"]  # no work files left

    await store.delete(KEY)
    assert not (tmp_path / "store" / seal_key(KEY)).exists()
    with pytest.raises(ObjectNotFound):
        await store.stat(KEY)


async def test_bytes_are_sealed_but_manifests_stay_plain(tmp_path: Path) -> None:
    secret, public = new_identity()
    store = sealed_store(tmp_path / "s", [public], identity_file(tmp_path / "id", secret))
    info = await store.upload_bytes("archive/seg-1", b"row data")
    assert info.size == 8
    assert (tmp_path / "s" / "archive" / "seg-1").read_bytes().startswith(MAGIC)
    assert await store.download_bytes("archive/seg-1") == b"row data"
    await store.upload_bytes("snapshots/x.json", b'{"format": 1}')
    assert (tmp_path / "s" / "snapshots" / "x.json").read_bytes() == b'{"format": 1}'
    assert not (tmp_path / "s" / "snapshots" / seal_key("x.json")).exists()


async def test_no_identity_names_the_object_and_its_recipients(tmp_path: Path) -> None:
    _, public = new_identity()
    _, public2 = new_identity()
    await sealed_store(tmp_path / "s", [public, public2]).upload(KEY, payload(tmp_path / "src"))
    reader = sealed_store(tmp_path / "s", [])
    with pytest.raises(SealError) as err:
        await reader.download(KEY, tmp_path / "out")
    text = str(err.value)
    assert KEY in text and public in text and public2 in text and "identity_file" in text
    assert not (tmp_path / "out").exists()
    with pytest.raises(SealError, match="no identity"):
        await reader.download_bytes(KEY)


async def test_wrong_identity_names_the_file_and_recipients(tmp_path: Path) -> None:
    _, public = new_identity()
    other, _ = new_identity()
    await sealed_store(tmp_path / "s", [public]).upload_bytes("archive/seg", b"x")
    ids = identity_file(tmp_path / "other.txt", other)
    with pytest.raises(SealError) as err:
        await sealed_store(tmp_path / "s", [], ids).download_bytes("archive/seg")
    assert "archive/seg" in str(err.value) and public in str(err.value)
    assert str(ids) in str(err.value) and other not in str(err.value)
    # Without the record beside it, the error still names the object.
    (tmp_path / "s" / seal_key("archive/seg")).unlink()
    with pytest.raises(SealError, match="recipients not recorded"):
        await sealed_store(tmp_path / "s", [], ids).download_bytes("archive/seg")


async def test_damaged_sealed_object_is_a_storage_error(tmp_path: Path) -> None:
    secret, public = new_identity()
    store = sealed_store(tmp_path / "s", [public], identity_file(tmp_path / "id", secret))
    await store.upload(KEY, payload(tmp_path / "src", 300_000))
    obj = tmp_path / "s" / KEY
    raw = bytearray(obj.read_bytes())
    raw[len(raw) // 2] ^= 1
    obj.write_bytes(bytes(raw))
    with pytest.raises(SealedObjectDamaged, match=KEY):
        await store.download(KEY, tmp_path / "out")
    assert not (tmp_path / "out").exists()


async def test_rotation_old_objects_open_with_the_old_identity_listed(tmp_path: Path) -> None:
    old_secret, old_public = new_identity()
    new_secret, new_public = new_identity()
    await sealed_store(tmp_path / "s", [old_public]).upload_bytes("archive/old", b"old")
    both = identity_file(tmp_path / "both", new_secret, old_secret)
    rotated = sealed_store(tmp_path / "s", [new_public], both)
    await rotated.upload_bytes("archive/new", b"new")
    record = json.loads((tmp_path / "s" / seal_key("archive/new")).read_text())
    assert record["recipients"] == [new_public]
    assert await rotated.download_bytes("archive/old") == b"old"
    assert await rotated.download_bytes("archive/new") == b"new"
    only_new = sealed_store(tmp_path / "s", [new_public], identity_file(tmp_path / "n", new_secret))
    with pytest.raises(SealError, match=old_public):
        await only_new.download_bytes("archive/old")


async def test_plain_and_sealed_objects_coexist(tmp_path: Path) -> None:
    secret, public = new_identity()
    plain = sealed_store(tmp_path / "s", [])
    src = payload(tmp_path / "src", 100_000)
    await plain.upload("snapshots/a.db", src)
    assert (tmp_path / "s" / "snapshots" / "a.db").read_bytes() == src.read_bytes()
    sealing = sealed_store(tmp_path / "s", [public], identity_file(tmp_path / "id", secret))
    await sealing.upload("snapshots/b.db", src)
    for key in ("snapshots/a.db", "snapshots/b.db"):
        out = tmp_path / key.replace("/", "-")
        await sealing.download(key, out)
        assert out.read_bytes() == src.read_bytes()
        assert (await sealing.stat(key)).size == 100_000
    # Plain objects need no identity; a later plain object under a sealed key is plain again.
    await plain.download("snapshots/a.db", tmp_path / "again")
    await plain.upload("snapshots/b.db", src)
    assert (await plain.stat("snapshots/b.db")).size == 100_000
    await plain.download("snapshots/b.db", tmp_path / "b-plain")


def test_a_write_error_while_age_flushes_is_not_lost(tmp_path: Path) -> None:
    class Full(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data: object) -> int:
            raise OSError(28, "No space left on device")

    _, public = new_identity()
    recipient = pyrage.x25519.Recipient.from_str(public)
    writer = _Writer(Full())  # type: ignore[arg-type]
    # pyrage drops the error of its last flush for a small input ...
    with contextlib.suppress(pyrage.EncryptError):
        pyrage.encrypt_io(io.BytesIO(b"x"), writer, [recipient])
    assert isinstance(writer.error, OSError)
    # ... so sealing a file raises it.
    src = tmp_path / "one"
    src.write_bytes(b"x")
    if Path("/dev/full").exists():
        with pytest.raises(OSError):
            _seal_file(src, Path("/dev/full"), [recipient], [public])


# -- manifests --------------------------------------------------------------------------------

def _manifest() -> Manifest:
    from datetime import UTC, datetime
    when = datetime(2024, 1, 1, tzinfo=UTC)
    return Manifest(
        id=new_snapshot_id(1, when, {"s-1": 5}), node_id=1, created_at=rfc3339(when),
        db_bytes=4096, db_sha256="a" * 64, stored_bytes=100, stored_sha256="b" * 64,
        compression="zstd", sequences={"s-1": 5}, schema_hash="c" * 64,
        tables=["patients_secret"],
        parked=[{"stream": "s-1", "seq": 4, "tbl": "later", "op": 18, "columns": "[]",
                 "keys": "{}", "vals": "c2VjcmV0LXJvdy12YWx1ZQ=="}],
    )


async def test_sealed_manifest_shows_no_table_names_or_rows(tmp_path: Path) -> None:
    secret, public = new_identity()
    store = sealed_store(tmp_path / "s", [public], identity_file(tmp_path / "id", secret))
    m = _manifest()
    sealed = seal_manifest(store, m)
    text = sealed.to_json().decode()
    assert "patients_secret" not in text and "c2VjcmV0" not in text and "later" not in text
    assert sealed.encryption == {"scheme": "age-x25519", "recipients": [public]}
    back = Manifest.from_json(sealed.to_json())
    assert await opened(store, back) == dataclasses.replace(m, encryption=sealed.encryption)
    with pytest.raises(SealError) as err:
        await opened(sealed_store(tmp_path / "s", []), back)
    assert back.manifest_key in str(err.value) and public in str(err.value)
    # Without recipients, nothing changes.
    assert seal_manifest(sealed_store(tmp_path / "p", []), m) == m
    assert seal_manifest(FileStore(tmp_path / "f"), m) == m
    assert await opened(FileStore(tmp_path / "f"), m) == m


def test_keys_default_is_plain() -> None:
    assert Keys().sealers() == []
    assert not SealedStore(FileStore(Path("/nonexistent-store"))).seals
