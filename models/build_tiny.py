"""Build the tiny random-weight models used by the tests and the CPU demo profile.

    python -m models.build_tiny [OUT_DIR]      # default: .cache/tiny-models in the repository

Each model is saved in the same layout as its real repository (config.json,
model.safetensors, tokenizer files, ...), so the services load it through the same
``from_pretrained`` code as the real weights. Nothing is downloaded. A folder that is
already complete is left alone; delete it to rebuild.
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / ".cache" / "tiny-models"
# name → module with `build(out_dir: Path) -> Path` (returns the folder to pass as --model)
BUILDERS = {"text": "models.vllm.tiny", "image": "models.flux.tiny", "music": "models.musicgen.tiny",
            "rerank": "models.rerank.tiny", "whisper": "models.whisper.tiny"}


def portable_tokenizer_configs(folder: Path) -> None:
    """Make the tokenizer_config.json files under ``folder`` load on transformers 4 as well as 5.

    transformers 5 writes ``"extra_special_tokens"`` as a list, where 4.x (the torch 2.9.1 stack's)
    expects a mapping and fails; real checkpoints, saved by 4.x, list such tokens (Whisper's language
    and timestamp tokens) as ``additional_special_tokens``, which both read.
    """
    import json

    for config in folder.rglob("tokenizer_config.json"):
        spec = json.loads(config.read_text())
        extra = spec.get("extra_special_tokens")
        if isinstance(extra, list) or extra == {}:
            del spec["extra_special_tokens"]
            if extra:
                spec["additional_special_tokens"] = extra
            config.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")


def build_all(out: Path, only: list[str] | None = None) -> dict[str, Path]:
    built = {}
    for name, module in BUILDERS.items():
        if only and name not in only:
            continue
        target = out / name
        marker = target / ".complete"
        if marker.exists():
            print(f"  {name}: {target} (already built)", flush=True)
            built[name] = target
            continue
        began = time.monotonic()
        print(f"  {name}: building {target} ...", flush=True)
        path = importlib.import_module(module).build(target)
        marker.write_text("ok\n")
        print(f"  {name}: done in {time.monotonic() - began:.1f}s", flush=True)
        built[name] = path
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--only", action="append", choices=list(BUILDERS), help="build just this one (repeatable)")
    args = parser.parse_args()
    print(f"building tiny models into {args.out}", flush=True)
    build_all(args.out, args.only)


if __name__ == "__main__":
    main()
