"""The top floor: the ``sealmq`` command (``app.cli``), the demo (``app.demo``) and the deployment
bootstrap (``app.bootstrap``). Only this package wires device, backend, broker and pki together;
nothing below it imports it (see docs/architecture.md and tests/test_layers.py)."""
