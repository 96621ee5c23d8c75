"""`liverstage crops` (not implemented yet)."""

import typer


def register(app: typer.Typer) -> None:
    @app.command("crops", hidden=True)
    def crops_command() -> None:
        """Not implemented yet."""
        raise typer.Exit(code=3)
