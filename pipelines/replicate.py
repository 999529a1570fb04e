"""Job entry point: `longtune replicate`. Works as `python pipelines/replicate.py [--config FILE] [KEY=VALUE ...]`
and as `ray job submit --working-dir . -- python pipelines/replicate.py ...` (joins the cluster in
RAY_ADDRESS). All logic lives in longtune/."""

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the submitted tree, not an installed copy, must run.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longtune.cli import job_main  # noqa: E402

if __name__ == "__main__":
    job_main("replicate")
