"""The `squall` command line: thin Typer commands over the orchestrator and federation APIs."""
