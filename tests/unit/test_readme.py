"""The README's "Testing your workflows" example runs, as a user would run it."""

from __future__ import annotations

import re
from typing import Any

import pytest

from leaseflow.fsm import registry
from tests.helpers import ROOT


def _example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Testing your workflows", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "the testing section has no python example"
    return match.group(1)


@pytest.fixture
def example() -> Any:
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(_example(), "README.md", "exec"), namespace)
    yield namespace
    registry.unregister(namespace["orders"])


def test_every_test_of_the_readme_example_passes(example: dict[str, Any]) -> None:
    tests = {name: fn for name, fn in example.items() if name.startswith("test_")}
    assert len(tests) == 4
    for fn in tests.values():
        fn()
