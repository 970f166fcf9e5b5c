"""Django: a primary key field whose values do not collide across nodes.

Usable as ``DEFAULT_AUTO_FIELD = "harmonylite.contrib.django.SnowflakeAutoField"`` (settings or an
``AppConfig.default_auto_field``) or on one model: ``id = SnowflakeAutoField(primary_key=True)``.
The column is Django's ``BigAutoField`` column (``integer`` on SQLite, so the id is the rowid);
only the value changes: it comes from :func:`harmonylite.ids.next_id` when the row is saved,
instead of from the node's own SQLite counter, which another node's counter duplicates.

Importing this module needs Django; the rest of harmonylite does not.
"""

from __future__ import annotations

from typing import Any

from django.db import models  # type: ignore[import-untyped,import-not-found,unused-ignore]

from harmonylite.ids import next_id


class SnowflakeAutoField(models.BigAutoField):  # type: ignore[misc,unused-ignore]
    """``BigAutoField`` with cluster-unique ids (see :mod:`harmonylite.ids`).

    The id is assigned at save time, not when the instance is built, so Django's checks for
    unsaved related objects (``pk is None``) keep working. ``Model.objects.create()`` and
    ``bulk_create()`` insert directly; a bare ``save()`` of a new instance first tries an UPDATE,
    as Django does for every explicit key.
    """

    description = "Big (8 byte) integer, unique across harmonylite nodes"

    def get_pk_value_on_save(self, instance: Any) -> Any:
        value = super().get_pk_value_on_save(instance)
        return next_id() if value is None else value
