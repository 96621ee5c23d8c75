"""`liverstage bench` (not implemented yet)."""

import typer


def register(app: typer.Typer) -> None:
    @app.command("bench", hidden=True)
    def bench_command() -> None:
        """Not implemented yet."""
        raise typer.Exit(code=3)
