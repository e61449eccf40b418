"""docs/ADDING_MODELS.md as written: every file it shows is written from its own code blocks into a
copy of the repository, and every command block marked ``run`` runs, in order, as a newcomer on a
CPU machine would run them (build the tiny model; ruff, mypy and the guide's own tests; serve it
with scripts/start-all.sh; call it with curl and the openai client; stop). If the guide changes,
this runs what it says now. Only the ports change: free ones for 9000 and 8010."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from core.config.scaffold import GUIDE, blocks, example_files
from tests.integration.conftest import free_port
from tests.integration.repo_copy import copy_repository, processes_under, run

pytest.importorskip("transformers")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def with_ports(text: str, ports: dict[int, int]) -> str:
    for documented, free in ports.items():
        text = re.sub(rf"\b{documented}\b", str(free), text)
    return text


def test_the_guide_works_as_written(tmp_path: Path) -> None:
    root = copy_repository(tmp_path)
    guide = GUIDE.read_text()
    ports = {9000: free_port(), 8010: free_port()}
    for path, text in example_files(guide).items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(with_ports(text, ports))
    steps = [block for block in blocks(guide) if block.runnable]
    assert [block.language for block in steps] == ["bash", "bash", "bash", "python", "bash"], "the guide changed shape"
    outputs = []
    try:
        for block in steps:
            script = with_ports(block.body, ports)
            argv = ["bash", "-euo", "pipefail", "-c", script] if block.language == "bash" else \
                [str(root / ".venv" / "bin" / "python"), "-c", script]
            done = run(root, argv)
            assert done.returncode == 0, (f"{GUIDE.name}:{block.line}: exit {done.returncode}\n{script}\n"
                                          f"--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}")
            outputs.append(done.stdout)
    finally:
        run(root, ["bash", "scripts/stop-all.sh"])
    built, checked, served, called, stopped = outputs
    assert "tiny-models/sentiment" in built
    assert re.search(r"\d+ passed", checked) and "failed" not in checked
    assert "OK, 1 model: sentiment" in served and "serving " in served  # start-all says what it serves
    assert '"model":"sentiment"' in served.replace(" ", "")  # curl without a model: routed by its endpoint
    labels, refused = called.splitlines()
    assert labels.split()[0] == "sentiment" and set(re.findall(r"'(\w+)'", labels)) <= {"NEGATIVE", "POSITIVE"}
    assert refused.startswith("400 {") and "'param': 'input'" in refused  # the error's body, as the client shows it
    assert "stopped" in stopped
    assert not processes_under(root), "the guide's commands left processes behind"
