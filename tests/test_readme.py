"""Every ```python block of README.md runs, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.usefixtures("fresh_dynamo")
def test_readme_examples_run():
    blocks = python_blocks()
    assert len(blocks) >= 5
    namespace: dict = {}
    for i, block in enumerate(blocks):
        if block.lstrip().startswith(
            'fast = torch.compile(model, backend="lowbit", options={"recipe": "int8-mixed"})'
        ):
            continue  # the one-line teaser at the top has no model yet
        try:
            exec(compile(block, f"README.md block {i}", "exec"), namespace)
        except Exception as e:  # pragma: no cover - the message names the block
            raise AssertionError(f"README python block {i} failed: {e!r}\n{block}") from e
    assert namespace["report"].sites
