"""`hasten methods`: the registered speedup methods with their metadata (the lead wires it into the CLI)."""
from __future__ import annotations


def run_methods_list(args: list[str] | None = None) -> int:
    """Print one row per method: name, domain, what it does, expected effect, options, citation."""
    from rich.console import Console
    from rich.table import Table

    from hasten.errors import HastenError
    from hasten.methods import method_table

    if args:
        raise HastenError(f"`hasten methods` takes no arguments, got {' '.join(args)}")
    table = Table(title="hasten methods (use: hasten train TASK methods=a,b:key=value)", show_lines=True)
    for col in ("name", "domain", "what it does", "expected effect", "options (defaults)", "citation"):
        table.add_column(col, overflow="fold")
    for row in method_table():
        options = " ".join(f"{k}={v}" for k, v in row["params"].items()) or "-"
        if row["conflicts"]:
            options += f"\nnot with: {', '.join(row['conflicts'])}"
        table.add_row(row["name"], row["domain"], row["summary"], row["effect"], options, row["citation"])
    Console(width=200).print(table)
    return 0
