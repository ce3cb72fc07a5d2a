"""IBO and every baseline on one ranking: the code is lancet_core.correction.compare (also `lancet compare`).

    python benchmarks/compare_correction.py [--config FILE] [--set a.b=c ...] [--seeds 0 1 2] ...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lancet_core.correction.compare import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
