"""Development and test tooling for cdc-relay: never shipped in the wheel or the image.

Throwaway servers (``devtools.servers``), the relay as a child process
(``devtools.relayproc``), the AMQP test consumer and topology helpers
(``devtools.consumer``, ``devtools.amqp``) and the /metrics scraper
(``devtools.metrics``) live here once, for the tests, the benchmark and
``make demo`` alike. It is importable from a checkout (the repository root on
``sys.path``: pytest's ``pythonpath``, ``python -m bench``, scripts run from
the root); ``pyproject.toml`` packages only ``cdc_relay*``.
"""
