"""The manifest of a committed snapshot (CONTRACT §5), its ids, keys and listing.

A store holds, per snapshot, ``snapshots/{id}.db.zst`` (or ``.db``) and ``snapshots/{id}.json``.
The manifest is written last, so a data object without its manifest is not a snapshot: listing
reads manifests only.

Snapshots are ordered by their position in the streams (the sum of their ``sequences``), never by
a wall clock: a node with a fast clock must not make its snapshot "newest" for ever. Ids are
``p{position, 15 digits}-{YYYYmmddTHHMMSSZ}-{node_id}-{8 hex}`` so that they sort the same way;
ids of the older form ``{YYYYmmddTHHMMSSZ}-{node_id}-{8 hex}`` stay readable (and sort before
every new one, which they precede).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from harmonylite import __version__
from harmonylite.errors import ObjectNotFound, SnapshotError
from harmonylite.storage.base import ObjectStore

log = logging.getLogger(__name__)

FORMAT = 1
PREFIX = "snapshots/"
MANIFEST_SUFFIX = ".json"
COMPRESSIONS = ("zstd", "none")
_ID_RE = re.compile(r"^(?:p\d{15}-)?(\d{8}T\d{6}Z)-(\d+)-([0-9a-f]{8})$")
POSITION_DIGITS = 15
# A data object without a manifest is deleted by retention only when the store says it is this
# much older than the oldest kept manifest (both times come from the store's own clock).
LEFTOVER_GRACE = timedelta(hours=1)


def position(sequences: dict[str, int]) -> int:
    """Where a snapshot stands in the streams: one number that grows with every stream."""
    return sum(max(0, int(v)) for v in sequences.values())


def new_snapshot_id(node_id: int, now: datetime | None = None,
                    sequences: dict[str, int] | None = None) -> str:
    """``p{position}-{UTC time as YYYYmmddTHHMMSSZ}-{node_id}-{8 hex}``: sorts by position."""
    when = (now or datetime.now(UTC)).astimezone(UTC)
    pos = min(position(sequences or {}), 10**POSITION_DIGITS - 1)
    return f"p{pos:0{POSITION_DIGITS}d}-{when:%Y%m%dT%H%M%SZ}-{node_id}-{secrets.token_hex(4)}"


def is_snapshot_id(text: str) -> bool:
    return _ID_RE.match(text) is not None


def data_key(snapshot_id: str, compression: str) -> str:
    return f"{PREFIX}{snapshot_id}.db" + (".zst" if compression == "zstd" else "")


def manifest_key(snapshot_id: str) -> str:
    return f"{PREFIX}{snapshot_id}{MANIFEST_SUFFIX}"


def snapshot_id_of_key(key: str) -> str | None:
    """The snapshot id a key belongs to (data object or manifest), or None for foreign keys."""
    if not key.startswith(PREFIX):
        return None
    name = key[len(PREFIX) :]
    for suffix in (MANIFEST_SUFFIX, ".db.zst", ".db"):
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            return stem if is_snapshot_id(stem) else None
    return None


def rfc3339(when: datetime) -> str:
    """RFC 3339 in UTC with microseconds, so captures within one second still order."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _created(manifest: Manifest) -> datetime:
    try:
        return datetime.fromisoformat(manifest.created_at).astimezone(UTC)
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Manifest:
    id: str
    node_id: int
    created_at: str  # RFC 3339, UTC
    db_bytes: int
    db_sha256: str
    stored_bytes: int
    stored_sha256: str
    compression: str  # "zstd" or "none"
    sequences: dict[str, int] = field(default_factory=dict)
    schema_hash: str = ""
    tables: list[str] = field(default_factory=list)
    version: str = __version__
    format: int = FORMAT
    # Optional, written only when not empty (older readers ignore them): per stream, per origin
    # database, the highest change id the snapshot has applied (a restored node then ignores
    # batches re-sent later, like its peers), and changes received but parked because the table
    # did not exist (their sequences are claimed, so the changes must travel with the snapshot).
    origins: dict[str, dict[str, int]] = field(default_factory=dict)
    parked: list[dict[str, Any]] = field(default_factory=list)
    # Optional too: each stream's last sequence when the capture began. The difference to
    # ``sequences`` is how far behind the streams the snapshot was (see ``behind``).
    heads: dict[str, int] = field(default_factory=dict)
    # Optional: with [snapshot.encryption], the recipients the data object is sealed to
    # ({"scheme": "age-x25519", "recipients": [...]}) and, sealed to them (base64 of an age file),
    # the parts that name tables or carry row data: ``tables`` and ``parked`` (see sealing.py).
    encryption: dict[str, Any] = field(default_factory=dict)
    sealed: str = ""
    # Optional: the taking node's own changes the database holds that had not all come back
    # from the streams ({"origins": [...], "upto": change id}, see ``packing.local_changes``).
    local: dict[str, Any] = field(default_factory=dict)

    @property
    def position(self) -> int:
        return position(self.sequences)

    @property
    def behind(self) -> dict[str, int]:
        """Messages each stream held beyond this snapshot when it was captured ({}: unknown)."""
        return {s: max(0, h - self.sequences.get(s, 0)) for s, h in self.heads.items()}

    def at_or_ahead(self, positions: dict[str, int]) -> bool:
        """True when this snapshot is at or ahead of ``positions`` on every stream."""
        return all(self.sequences.get(s, 0) >= p for s, p in positions.items())

    @property
    def data_key(self) -> str:
        return data_key(self.id, self.compression)

    @property
    def manifest_key(self) -> str:
        return manifest_key(self.id)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for optional in ("origins", "parked", "heads", "encryption", "sealed", "local"):
            if not out[optional]:
                del out[optional]
        # "format" first, as in the contract's listing of the keys.
        return {"format": out.pop("format"), **out}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False).encode() + b"\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        try:
            fmt = data["format"]
            if fmt != FORMAT:
                raise SnapshotError(f"unsupported snapshot manifest format {fmt!r}")
            compression = str(data["compression"])
            if compression not in COMPRESSIONS:
                raise SnapshotError(f"unsupported snapshot compression {compression!r}")
            snapshot_id = str(data["id"])
            if not is_snapshot_id(snapshot_id):
                raise SnapshotError(f"invalid snapshot id {snapshot_id!r}")
            return cls(
                id=snapshot_id,
                node_id=int(data["node_id"]),
                created_at=str(data["created_at"]),
                db_bytes=int(data["db_bytes"]),
                db_sha256=str(data["db_sha256"]),
                stored_bytes=int(data["stored_bytes"]),
                stored_sha256=str(data["stored_sha256"]),
                compression=compression,
                sequences={str(k): int(v) for k, v in dict(data.get("sequences", {})).items()},
                schema_hash=str(data.get("schema_hash", "")),
                tables=[str(t) for t in data.get("tables", [])],
                version=str(data.get("version", "")),
                format=int(fmt),
                origins={str(s): {str(o): int(h) for o, h in dict(m).items()}
                         for s, m in dict(data.get("origins", {})).items()},
                parked=[dict(p) for p in data.get("parked", [])],
                heads={str(k): int(v) for k, v in dict(data.get("heads", {})).items()},
                encryption=dict(data.get("encryption", {})),
                sealed=str(data.get("sealed", "")),
                local=_local(data.get("local", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"malformed snapshot manifest: {exc!r}") from exc

    @classmethod
    def from_json(cls, raw: bytes | str) -> Manifest:
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise SnapshotError(f"snapshot manifest is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise SnapshotError("snapshot manifest is not a JSON object")
        return cls.from_dict(data)


def _local(raw: Any) -> dict[str, Any]:
    if not raw:
        return {}
    return {"origins": [str(o) for o in raw["origins"]], "upto": int(raw["upto"])}


def newest_first(manifests: list[Manifest]) -> list[Manifest]:
    """By position in the streams; a wall clock only breaks ties between equal positions."""
    return sorted(manifests, key=lambda m: (m.position, _created(m), m.id), reverse=True)


async def list_snapshots(store: ObjectStore) -> list[Manifest]:
    """Committed snapshots (those whose manifest is present), newest first.

    A manifest that cannot be read or parsed is skipped with a warning: it does not hide the
    others.
    """
    manifests: list[Manifest] = []
    for info in await store.list(PREFIX):
        if not info.key.endswith(MANIFEST_SUFFIX) or snapshot_id_of_key(info.key) is None:
            continue
        try:
            manifest = Manifest.from_json(await store.download_bytes(info.key))
        except ObjectNotFound:
            continue  # deleted while we listed (pruned by another run)
        except SnapshotError as exc:
            log.warning("skipping unreadable snapshot manifest %s: %s", info.key, exc)
            continue
        if manifest.manifest_key != info.key:
            log.warning("skipping snapshot manifest %s: it names id %s", info.key, manifest.id)
            continue
        manifests.append(manifest)
    return newest_first(manifests)


async def find_snapshot(store: ObjectStore, ref: str = "latest") -> Manifest:
    """The snapshot named by ``ref``: an id, or ``latest``; raises SnapshotError when absent."""
    if ref in ("", "latest"):
        found = await list_snapshots(store)
        if not found:
            raise SnapshotError("no committed snapshot in the store")
        return found[0]
    if not is_snapshot_id(ref):
        raise SnapshotError(
            f"invalid snapshot id {ref!r}: expected latest or an id as `snapshot list` prints it"
        )
    try:
        named = Manifest.from_json(await store.download_bytes(manifest_key(ref)))
    except ObjectNotFound as exc:
        raise SnapshotError(f"no committed snapshot {ref} in the store") from exc
    if named.id != ref:
        # Its data key derives from the id inside: "ok" would vouch for another snapshot.
        raise SnapshotError(f"the manifest stored as snapshot {ref} names snapshot {named.id}: "
                            "it is not the snapshot asked for")
    return named


async def delete_snapshot(store: ObjectStore, manifest: Manifest) -> None:
    """Delete a snapshot: data object first, then its manifest."""
    await store.delete(manifest.data_key)
    await store.delete(manifest.manifest_key)


def retained(committed: list[Manifest], keep: int,
             keep_since: datetime | None = None) -> list[Manifest]:
    """Of ``committed`` (newest first), those retention keeps: the newest ``keep`` and, with
    ``keep_since`` (an archive's horizon), every one taken since then plus the newest one
    before it, where the archive's history begins."""
    kept = {m.id for m in committed[:keep]}
    if keep_since is not None:
        older = [m for m in committed if _created(m) < keep_since]
        kept |= {m.id for m in committed if _created(m) >= keep_since}
        if older:
            kept.add(older[0].id)
    return [m for m in committed if m.id in kept]


async def prune(store: ObjectStore, keep: int,
                keep_since: datetime | None = None) -> list[str]:
    """Delete committed snapshots retention does not keep (see :func:`retained`), oldest first;
    returns their ids.

    Data objects without a manifest are leftovers of failed runs when the store's own clock
    puts them well (LEFTOVER_GRACE) before the oldest kept manifest: a capture still uploading
    is never removed, whatever the clocks of the nodes say.
    """
    committed = await list_snapshots(store)
    kept = retained(committed, keep, keep_since)
    kept_ids = {m.id for m in kept}
    doomed = [m for m in reversed(committed) if m.id not in kept_ids]
    removed: list[str] = []
    for manifest in doomed:
        await delete_snapshot(store, manifest)
        removed.append(manifest.id)
    if kept:
        listing = await store.list(PREFIX)
        stamps = {i.key: i.modified for i in listing}
        known = {m.id for m in committed}
        kept_times = [stamps.get(m.manifest_key) for m in kept]
        if any(t is None for t in kept_times):
            return removed  # the store does not say when: keep what might be in flight
        horizon = min(t for t in kept_times if t is not None) - LEFTOVER_GRACE
        for info in listing:
            sid = snapshot_id_of_key(info.key)
            if sid is None or sid in known or info.key.endswith(MANIFEST_SUFFIX):
                continue
            if info.modified is not None and _utc(info.modified) < _utc(horizon):
                log.info("deleting leftover snapshot data object %s", info.key)
                await store.delete(info.key)
    return removed


def _utc(when: datetime) -> datetime:
    return when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)
