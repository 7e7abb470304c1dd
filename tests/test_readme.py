"""The README documents what the code accepts: every recipe key, prompt template, command and offline
data file (a key added to the code without a line in the README fails here)."""

from __future__ import annotations

import re

import pytest

from grootl.cli import COMMANDS
from grootl.data.templates import TEMPLATES
from grootl.evaluation.tasks import offline_data_files
from grootl.train.recipe import valid_keys

from conftest import REPO

README = (REPO / "README.md").read_text()


def section(title: str) -> str:
    """The README's ``## title`` section, up to the next ``## ``."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert match, f"README has no section {title!r}"
    return match.group(1)


@pytest.mark.parametrize("key", valid_keys())
def test_every_recipe_key_is_in_the_key_table(key):
    rows = [line for line in section("Fine-tuning").splitlines() if line.startswith("| `")]
    assert any(f"`{key}`" in row.split(" | ")[0] for row in rows), f"recipe key {key} is not in the README's key table"


def test_the_key_table_names_no_key_the_code_lacks():
    rows = [line for line in section("Fine-tuning").splitlines() if line.startswith("| `") and " | " in line]
    named = {key for row in rows for key in re.findall(r"`([\w.]+)`", row.split(" | ")[0]) if "/" not in key}
    named -= {name for name in named if name.endswith(".yaml")}
    assert named and named <= set(valid_keys())


def test_every_template_and_command_is_documented():
    for name in TEMPLATES:
        assert f"`{name}`" in section("Fine-tuning"), name
    for name in COMMANDS:
        assert f"grootl {name}" in README, name


def test_every_offline_data_file_is_described():
    table = section("Evaluation")
    for task, files in offline_data_files().items():
        for name in files:
            assert f"| `{name}` |" in table, f"{task}: {name}"
