"""The ``adforge`` command: the command groups of this package joined into one Typer app.

``generate``, the campaign commands (``run``, ``plan``, ...) and ``gallery`` / ``export`` are top-level commands:
their modules' apps are added without a name, which registers their commands at the top level. The order of the
``add_typer`` calls is the order ``adforge --help`` lists them in.
"""

from __future__ import annotations

import typer

from cli import brand, campaign, generate, models, review, tokens, train, users, verify

__all__ = ["app"]

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Campaign briefs in, reviewed AI image variants out.")


@app.callback()
def main() -> None:
    """adforge: render, store and audit AI image variants."""


app.add_typer(generate.app)  # generate
app.add_typer(campaign.app)  # run, rerender, plan, runs, assets
app.add_typer(review.app)  # gallery, export
app.add_typer(verify.app)  # verify
app.add_typer(models.app, name="models")
app.add_typer(users.app, name="users")
app.add_typer(tokens.app, name="tokens")
app.add_typer(review.results_app, name="results")
app.add_typer(review.audit_app, name="audit")
app.add_typer(train.app, name="train")
app.add_typer(brand.app, name="brand")


if __name__ == "__main__":
    app()
