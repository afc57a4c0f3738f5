"""``python -m cli``: the ``adforge`` command without its console script."""

from cli.app import app

app()
