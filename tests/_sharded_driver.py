"""Run a sharded flow in a fresh process (for tests/test_distributed.py).

    python tests/_sharded_driver.py SPEC.json OUT.json

The flows run here, not in the pytest process: a flow run leaves Prefect clients and
background log/event workers bound to the server it used, and those would outlive the
test's server and stall the other tests' Prefect harness. SPEC holds the config (as JSON),
the stage paths, and ``flow``: "sharded" (lancet-sharded-influence) or "main" (lancet-correction).
The Prefect server comes from PREFECT_API_URL, which the test sets.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(spec_path: str, out_path: str) -> None:
    import torch

    from lancet_core.config import LancetConfig

    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    cfg = LancetConfig.model_validate(spec["config"])
    started = time.time()
    if spec["flow"] == "main":
        from flows.correction import lancet_correction

        result = lancet_correction(cfg)
    else:
        from tasks.orchestration import with_runner
        from flows.sharded import sharded_influence

        result = with_runner(sharded_influence, cfg)(
            cfg, spec["data_dir"], spec["data_digest"], spec["model_dir"], spec["model_checksum"],
            spec["queries_dir"], spec["fit_dir"], spec["scores_dir"])
    result["driver_wall_s"] = round(time.time() - started, 3)
    Path(out_path).write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:3])
