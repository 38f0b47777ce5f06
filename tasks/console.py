"""The command line's one console: every command prints through it; library code only logs."""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

console = Console()


def plain(value: object) -> Text:
    """A user-controlled string (a name, a path, an error) as text: never read as Rich markup.

    A folder named `[/bold] Mina` is shown as it is; as markup it would end the command with
    a MarkupError. Table cells take it as it is; inside markup, use `escape()` instead.
    """
    return Text(str(value))
