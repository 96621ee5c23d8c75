"""`liverstage predict` (not implemented yet)."""

import typer


def register(app: typer.Typer) -> None:
    @app.command("predict", hidden=True)
    def predict_command() -> None:
        """Not implemented yet."""
        raise typer.Exit(code=3)
