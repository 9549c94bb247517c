"""A minimal Django project: the cdc-relay app on the throwaway Postgres.

The test sets ``CDC_RELAY_TEST_DJANGO_DSN`` before ``django.setup()``; the
``other`` alias is the same database through a second connection, to test
``using=``.
"""

from __future__ import annotations

import os

from psycopg.conninfo import conninfo_to_dict

_dsn = conninfo_to_dict(os.environ.get("CDC_RELAY_TEST_DJANGO_DSN", "postgresql:///postgres"))
_database = {
    "ENGINE": "django.db.backends.postgresql",
    "NAME": _dsn.get("dbname", "postgres"),
    "USER": _dsn.get("user", "postgres"),
    "PASSWORD": _dsn.get("password", ""),
    "HOST": _dsn.get("host", ""),
    "PORT": _dsn.get("port", ""),
}

SECRET_KEY = "tests-only"
USE_TZ = True
INSTALLED_APPS = ["cdc_relay.contrib.django"]
DATABASES = {"default": _database, "other": dict(_database)}
CDC_RELAY_TABLE = os.environ.get("CDC_RELAY_TEST_DJANGO_TABLE", "public.outbox")
CDC_RELAY_INBOX_TABLE = os.environ.get("CDC_RELAY_TEST_DJANGO_INBOX", "public.processed_messages")
