"""clinfuse: clinical risk prediction from DICOM images, irregular ICU vitals and
labs, and genetic markers, fused with cross-modal attention and audited for
scanner-site and ancestry confounding.

The Python API (``docs/python-api.md``)::

    import clinfuse

    cohort = clinfuse.simulate("sim", subjects=400, seed=1)
    run = clinfuse.train(cohort, config="demo", run_dir="runs/x")
    report = clinfuse.evaluate(run, cohort)
    scores = clinfuse.score(run, cohort)

Everything else is reachable (``clinfuse.training.run`` ...) but not part of the
promise.
"""

from __future__ import annotations

from clinfuse._compat import install_torchvision_hook
from clinfuse.api import Cohort, Report, Run, evaluate, score, simulate, train
from clinfuse.errors import CohortError, UserError

# Before timm (or anything) imports torchvision; not now, which would load torch.
install_torchvision_hook()

__version__ = "0.1.0"

__all__ = [
    "Cohort",
    "CohortError",
    "Report",
    "Run",
    "UserError",
    "evaluate",
    "score",
    "simulate",
    "train",
    "__version__",
]
