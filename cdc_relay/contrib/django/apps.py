"""The Django app config: ``INSTALLED_APPS = [..., "cdc_relay.contrib.django"]``."""

from __future__ import annotations

from django.apps import AppConfig


class CdcRelayConfig(AppConfig):
    name = "cdc_relay.contrib.django"
    label = "cdc_relay"
    verbose_name = "cdc-relay outbox"
