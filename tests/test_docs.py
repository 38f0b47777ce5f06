"""The README stays true to the code: its settings table and its commands."""

from __future__ import annotations

from pathlib import Path

from tasks.cli import build_parser, settings_table

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_settings_table_is_the_one_the_code_prints() -> None:
    assert settings_table() in README, "run `aftertrip-faces settings` and paste it into README"


def test_readme_names_every_command() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name in commands:
        assert f"aftertrip-faces {name}" in README, name


def test_readme_two_commands_exist_in_the_makefile() -> None:
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert "make demo" in README and "make test" in README
    assert "\ndemo:" in makefile and "\ntest:" in makefile
