"""The outbox table (the DDL of sql/outbox.sql) and the inbox's processed_messages.

Table names come from settings at migrate time (CDC_RELAY_TABLE,
CDC_RELAY_INBOX_TABLE), so the SQL is built in RunPython, not at import.
"""

from __future__ import annotations

from typing import Any

from django.db import migrations

from cdc_relay import schema
from cdc_relay.contrib.django import inbox_table, outbox_table


def create(apps: Any, schema_editor: Any) -> None:
    outbox = schema.split_table_name(outbox_table())
    inbox = schema.split_table_name(inbox_table())
    schema_editor.execute(schema.outbox_ddl(outbox).as_string(None))
    schema_editor.execute(schema.inbox_ddl(inbox).as_string(None))


def drop(apps: Any, schema_editor: Any) -> None:
    for table in (inbox_table(), outbox_table()):
        name = schema.qualified_text(schema.split_table_name(table))
        schema_editor.execute(f"DROP TABLE IF EXISTS {name}")


class Migration(migrations.Migration):
    initial = True
    dependencies: list[tuple[str, str]] = []
    operations = [migrations.RunPython(create, drop)]
