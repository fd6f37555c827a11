"""The documentation tells the truth about the code it documents."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from spamguardd.core.config import Config
from spamguardd.core.errors import ConfigError

DOCS = Path(__file__).parent.parent / "docs"


def accepted_keys(section: str) -> set[str]:
    """The keys the configuration loader accepts in *section*, read from its own error message."""
    if section == "":
        raw: dict[str, object] = {"zz_unknown": 1}
    elif section == "override":
        raw = {"override": [{"zz_unknown": 1, "user": "u", "failed_recipients": "1/1h"}]}
    else:
        raw = {section: {"zz_unknown": 1}}
    with pytest.raises(ConfigError) as info:
        Config.from_dict(raw, source="t")
    [problem] = [p for p in info.value.problems if "zz_unknown" in p]
    known = re.search(r"\(known: (.*)\)", problem)
    assert known is not None, problem
    return set(known.group(1).split(", "))


def documented_keys(section: str) -> set[str]:
    """Keys in the first column of the table under the section's heading in configuration.md."""
    text = (DOCS / "configuration.md").read_text()
    heading = "## Top level" if section == "" else f"## `[{section}]`"
    if section == "override":
        heading = "## `[[override]]`"
    body = text.split(heading, 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", body, re.MULTILINE))


def sections() -> list[str]:
    return sorted(accepted_keys("") - {"mode"})


@pytest.mark.parametrize("section", ["", *sections()])
def test_every_configuration_key_is_documented(section: str) -> None:
    """docs/configuration.md lists every key the loader accepts, and no key it refuses."""
    keys = accepted_keys(section)
    if section == "":
        keys = {key for key in keys if key not in sections()}
    assert documented_keys(section) == keys


def documented_modules() -> set[str]:
    """The modules in the table of docs/design.md, as ``package/module`` paths."""
    body = (DOCS / "design.md").read_text().split("## Layers", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_/]+)` \|", body, re.MULTILINE))


def package_modules() -> set[str]:
    """Every module of the package, as ``package/module`` paths (package markers left out)."""
    root = Path(__file__).parent.parent / "spamguardd"
    return {
        path.relative_to(root).with_suffix("").as_posix()
        for path in root.rglob("*.py")
        if path.name not in {"__init__.py", "__main__.py"}
    }


def test_design_module_table_matches_the_tree() -> None:
    """docs/design.md lists every module where it lives, and no module that is gone."""
    assert documented_modules() == package_modules()
