"""`liverstage export` (not implemented yet)."""

import typer


def register(app: typer.Typer) -> None:
    @app.command("export", hidden=True)
    def export_command() -> None:
        """Not implemented yet."""
        raise typer.Exit(code=3)
