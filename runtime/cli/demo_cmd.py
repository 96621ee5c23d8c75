"""`liverstage demo` (not implemented yet)."""

import typer


def register(app: typer.Typer) -> None:
    @app.command("demo", hidden=True)
    def demo_command() -> None:
        """Not implemented yet."""
        raise typer.Exit(code=3)
