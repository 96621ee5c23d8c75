"""`liverstage synth` (not implemented yet)."""

import typer


def register(app: typer.Typer) -> None:
    @app.command("synth", hidden=True)
    def synth_command() -> None:
        """Not implemented yet."""
        raise typer.Exit(code=3)
