"""The docs stay true to the code: the settings table, the commands, the README's two commands."""

from __future__ import annotations

from pathlib import Path

from tasks.cli import build_parser, settings_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SETTINGS = (ROOT / "docs" / "settings.md").read_text()
COMMANDS = (ROOT / "docs" / "commands.md").read_text()


def test_settings_page_table_is_the_one_the_code_prints() -> None:
    assert settings_table() in SETTINGS, (
        "run `aftertrip-faces settings` and paste it into docs/settings.md"
    )


def test_commands_page_names_every_command() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name in commands:
        assert f"aftertrip-faces {name}" in COMMANDS, name


def test_readme_two_commands_exist_in_the_makefile() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "make demo" in README and "make test" in README
    assert "\ndemo:" in makefile and "\ntest:" in makefile
