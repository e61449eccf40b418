"""An offline Hugging Face cache holding one repo: how the GPU profile's services find their weights.

The playbook's `models` tag fills ``HF_HOME/hub`` with huggingface_hub's layout; the services get
the repo id and ``HF_HUB_OFFLINE=1``. This writes the same layout from a local folder.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path


def hub_snapshot(hf_home: Path, repo_id: str, source: Path | None = None) -> Path:
    """``HF_HOME/hub/models--ORG--NAME/snapshots/<commit>`` with ``refs/main`` pointing at it.

    The snapshot is a copy of ``source`` when given, else an empty folder to fill.
    """
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    if source is not None:
        shutil.copytree(source, snapshot)
    else:
        snapshot.mkdir(parents=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
