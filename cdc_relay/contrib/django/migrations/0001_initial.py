"""The outbox table (the DDL of sql/outbox.sql) and the inbox's processed_messages.

Table names come from settings at migrate time (CDC_RELAY_TABLE,
CDC_RELAY_INBOX_TABLE), so the SQL is built in RunPython, not at import.
"""

from __future__ import annotations

from typing import Any

from django.db import migrations

from cdc_relay import inbox
from cdc_relay.contrib.django import inbox_table, outbox_table
from cdc_relay.outbox import outbox_ddl, qualified_name


def create(apps: Any, schema_editor: Any) -> None:
    schema_editor.execute(outbox_ddl(outbox_table()))
    schema_editor.execute(inbox.ddl(inbox_table()))


def drop(apps: Any, schema_editor: Any) -> None:
    schema_editor.execute(f"DROP TABLE IF EXISTS {qualified_name(inbox_table())}")
    schema_editor.execute(f"DROP TABLE IF EXISTS {qualified_name(outbox_table())}")


class Migration(migrations.Migration):
    initial = True
    dependencies: list[tuple[str, str]] = []
    operations = [migrations.RunPython(create, drop)]
