"""The ``adforge`` command: one Typer app per module, joined in :mod:`cli.app`."""
