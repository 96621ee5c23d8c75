"""`liverstage train` (not implemented yet)."""

import typer


def register(app: typer.Typer) -> None:
    @app.command("train", hidden=True)
    def train_command() -> None:
        """Not implemented yet."""
        raise typer.Exit(code=3)
