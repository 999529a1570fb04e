"""`longtune tune`: a Ray Tune search over S2-Attn group size, LoRA rank, adapter type and
learning rate, one longtune training per trial, tracked in MLflow.

One job a module: ``space`` (what may be searched, checked before Ray starts), ``resources``
(what a trial holds, how many run at once), ``data`` (the blocks prepared once for every
trial), ``trial`` (the function trainable: one training), ``cleanup`` (ending a stopped
trial's Train run: a Ray workaround, alone so it can go), ``asha`` (rungs that survive a
resume), ``progress`` (console lines), ``search`` (the driver: ``tune()``), ``results``
(rows, best trial, CSV, table, plot), ``mlflow_runs`` (parent and nested runs), ``command``
(``longtune tune``). Imports point one way (command -> search -> trial -> cleanup, mlflow_runs, space; search ->
the others) and name modules, never this package, so there is no circle.
"""

from longtune.tune.command import tune_command
from longtune.tune.mlflow_runs import with_resolved_tracking
from longtune.tune.resources import TuneSetupError, concurrency, fitting_trials
from longtune.tune.results import TrialRow, TuneResult
from longtune.tune.search import tune
from longtune.tune.space import check_search_space

# Ray Tune pickles these by module and name into a search's state (tuner.pkl); a search
# saved when they lived in longtune/tune.py finds them here when it resumes.
from longtune.tune.asha import ResumableASHA  # noqa: F401
from longtune.tune.cleanup import ReleaseTrialRuns  # noqa: F401
from longtune.tune.progress import ProgressLines  # noqa: F401
from longtune.tune.search import _trial_dirname  # noqa: F401

__all__ = [
    "TrialRow", "TuneResult", "TuneSetupError", "check_search_space", "concurrency",
    "fitting_trials", "tune", "tune_command", "with_resolved_tracking",
]
