"""docs/containers.md shows the example files that the container stage builds and runs."""

from __future__ import annotations

import re

from tests.conftest import ROOT

EXAMPLES = ROOT / "docs/examples"


def test_containers_md_shows_the_examples_as_they_are() -> None:
    doc = (ROOT / "docs/containers.md").read_text()
    for name, fence in (("Dockerfile", "dockerfile"), ("pod.yaml", "yaml")):
        blocks = re.findall(rf"```{fence}\n(.*?)```", doc, flags=re.S)
        text = (EXAMPLES / name).read_text()
        assert text in blocks, f"docs/containers.md does not show docs/examples/{name} as it is"
