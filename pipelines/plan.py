"""Job entry point: `longtune plan`. Works as `python pipelines/plan.py [--config FILE] [KEY=VALUE ...] --gpu GPU [--json]`
(no Ray, no GPU, no network: it reads the model's config.json and predicts memory and FLOPs).
All logic lives in longtune/."""

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the submitted tree, not an installed copy, must run.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longtune.cli import job_main  # noqa: E402

if __name__ == "__main__":
    job_main("plan")
