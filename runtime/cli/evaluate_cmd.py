"""`liverstage evaluate` (not implemented yet)."""

import typer


def register(app: typer.Typer) -> None:
    @app.command("evaluate", hidden=True)
    def evaluate_command() -> None:
        """Not implemented yet."""
        raise typer.Exit(code=3)
