"""What a snapshot manifest keeps sealed when the store seals (``[snapshot.encryption]``).

Manifests stay plain: every node lists, orders and prunes snapshots, and decides when to take the
next one, from them, with or without an identity. So a sealed snapshot's manifest shows only
what those decisions need (ids, times, sizes, hashes, stream positions, the schema's hash, the
recipients) and moves the rest into its ``sealed`` field, an age file (base64) sealed to the same
recipients as the data: the table names, and the parked changes (rows received for a table the
snapshot lacks). A restore opens it with the node's identities.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
from typing import Any

from harmonylite.errors import SealError, SnapshotError
from harmonylite.snapshot.manifest import Manifest
from harmonylite.storage.base import ObjectStore
from harmonylite.storage.sealed import SCHEME, SealedStore


def seal_manifest(store: ObjectStore, manifest: Manifest) -> Manifest:
    """``manifest`` as a sealing store should commit it (unchanged when the store does not seal)."""
    if not isinstance(store, SealedStore) or not store.seals:
        return manifest
    inner = json.dumps({"tables": manifest.tables, "parked": manifest.parked}).encode()
    blob = store.seal_bytes(inner)
    return dataclasses.replace(
        manifest, tables=[], parked=[], sealed=base64.b64encode(blob).decode("ascii"),
        encryption={"scheme": SCHEME, "recipients": store.recipients},
    )


async def opened(store: ObjectStore, manifest: Manifest) -> Manifest:
    """``manifest`` with its sealed parts opened (unchanged when it has none).

    Raises SealError naming the manifest and its recipients when no identity opens them.
    """
    if not manifest.sealed:
        return manifest
    recipients = [str(r) for r in manifest.encryption.get("recipients", [])] or None
    what = f"the sealed part of {manifest.manifest_key}"
    if not isinstance(store, SealedStore):
        raise SealError(what, recipients, "this store was opened without sealing support")
    try:
        blob = base64.b64decode(manifest.sealed, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SnapshotError(f"{what} is not base64: {exc}") from None
    raw = await asyncio.to_thread(store.open_bytes, blob, what, recipients)
    try:
        inner: dict[str, Any] = json.loads(raw)
        tables = [str(t) for t in inner.get("tables", [])]
        parked = [dict(p) for p in inner.get("parked", [])]
    except (ValueError, TypeError, AttributeError) as exc:
        raise SnapshotError(f"{what} is malformed: {exc}") from None
    return dataclasses.replace(manifest, tables=tables, parked=parked, sealed="")
