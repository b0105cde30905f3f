"""The docs stay in step with the code: every config key documented, none invented."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from neuronctl.config import HarnessConfig, KeySpec, ModelSpec, NeuronConfig

DOCS = Path(__file__).resolve().parent.parent / "docs"
KEY_CELL = re.compile(r"^\| `([a-z_][a-z0-9_]*)` \|", re.M)


def documented_keys() -> set[str]:
    return set(KEY_CELL.findall((DOCS / "config.md").read_text(encoding="utf-8")))


def config_keys() -> set[str]:
    return {f.name for cls in (NeuronConfig, HarnessConfig, ModelSpec, KeySpec)
            for f in dataclasses.fields(cls)}


def test_every_config_key_is_in_the_reference() -> None:
    missing = config_keys() - documented_keys()
    assert not missing, f"docs/config.md lacks a table row for: {sorted(missing)}"


def test_the_reference_documents_no_key_that_does_not_exist() -> None:
    invented = documented_keys() - config_keys()
    assert not invented, f"docs/config.md documents keys the config rejects: {sorted(invented)}"


def test_readme_links_resolve() -> None:
    readme = (DOCS.parent / "README.md").read_text(encoding="utf-8")
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (DOCS.parent / target).is_file(), target


def test_the_security_page_gives_every_route_its_role() -> None:
    from neuronctl.api.roles import ROUTE_ROLES

    page = (DOCS / "security.md").read_text(encoding="utf-8")
    table = page[page.index("### Every route and the role it needs"):]
    missing = [path for path in ROUTE_ROLES if path not in table]
    assert not missing, f"docs/security.md's roles table lacks: {missing}"
