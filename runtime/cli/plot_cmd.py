"""`liverstage plot` (not implemented yet)."""

import typer


def register(app: typer.Typer) -> None:
    @app.command("plot", hidden=True)
    def plot_command() -> None:
        """Not implemented yet."""
        raise typer.Exit(code=3)
