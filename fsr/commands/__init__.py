"""Typer command functions, one module per subcommand; each parses options and calls one library function."""
