"""`liverstage experiment` (not implemented yet)."""

import typer


def register(app: typer.Typer) -> None:
    @app.command("experiment", hidden=True)
    def experiment_command() -> None:
        """Not implemented yet."""
        raise typer.Exit(code=3)
