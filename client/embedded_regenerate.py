"""``python -m client.embedded_regenerate`` (``make embedded-model``): rebuild the shipped embedded model.

Run after changing :data:`client.pretrain.RECIPE`; ``tests/client/test_pretrain.py``
fails until the shipped folder (:data:`client.embedded_artifact.SHIPPED_DIR`)
is the current recipe's build. Kept apart from :mod:`client.embedded_artifact`
(which the builder imports) so neither imports the other.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from client import pretrain
from client.embedded_artifact import SHIPPED_DIR, WEIGHTS_FILE
from shared.atomic import replace_dir


def regenerate(out: Path = SHIPPED_DIR, *, seed: int = 0) -> dict[str, Any]:
    """Build the embedded model from the current RECIPE (seed ``seed``) and put it in ``out``.

    Builds in a temporary folder beside ``out`` and swaps it in only when
    complete, so an interrupted run leaves the old shipped model. Returns BUILD.json.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        last = [0]

        def progress(step: int, total: int, loss: float) -> None:
            if step == total or step - last[0] >= 50:
                last[0] = step
                print(f"step {step}/{total} loss {loss:.3f}", flush=True)

        record = pretrain.build_embedded(pretrain.public_corpus(seed), tmp, seed=seed, progress=progress)
        pretrain.write_build(tmp, record)
        replace_dir(tmp, out, ["BUILD.json", WEIGHTS_FILE])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def main() -> int:
    """Regenerate the shipped folder; prints the BUILD.json numbers."""
    record = regenerate()
    keys = ("steps", "seconds", "final_loss", "weights_sha256", "corpus_sha256")
    print(json.dumps({k: record[k] for k in keys}, indent=2))
    print(f"shipped embedded model: {SHIPPED_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
