"""ASHA whose rungs survive ``--resume``.

Tune pickles the scheduler once, when the sweep starts (``tuner.pkl``), and a
restored sweep gets that empty copy back: no rung remembers a score, so a resumed
trial passing a rung is compared with nobody and runs to ``max_t`` (a weak config
trained 8 epochs after a resume where it had been stopped after 2 before).
``ResumableASHA`` writes its rungs to a small JSON file after every decision
(write, then rename) and reads them back the first time a restored copy is used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler

from clinfuse.integrity.checksums import temp_file_beside


class ResumableASHA(ASHAScheduler):
    """``ASHAScheduler`` (same arguments) plus ``state_file``, where its rungs live.

    The file holds, per bracket, ``[[milestone, {trial_id: score}], ...]`` and the
    number of trials stopped so far. It may be one decision ahead of Tune's own
    experiment snapshot; a trial that then re-reports an epoch finds its score
    already recorded at that rung, which ASHA treats as decided (continue).
    """

    def __init__(self, state_file: str | Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._state_file = str(state_file)
        self._restored = True  # a fresh scheduler has nothing to read

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._restored = False  # unpickled (Tuner.restore): read the rungs on first use

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._restore_rungs()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._restore_rungs()
        action = super().on_trial_result(tune_controller, trial, result)
        self._save_rungs()
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._restore_rungs()
        super().on_trial_complete(tune_controller, trial, result)
        self._save_rungs()

    def rungs(self) -> list[list[list[Any]]]:
        """Per bracket, ``[milestone, {trial_id: score}]`` from the last rung to the first."""
        return [[[m, dict(r)] for m, r in bracket._rungs] for bracket in self._brackets]

    def _save_rungs(self) -> None:
        payload = {"rungs": self.rungs(), "num_stopped": self._num_stopped}
        folder = os.path.dirname(self._state_file) or "."
        os.makedirs(folder, exist_ok=True)
        fd, tmp = temp_file_beside(folder, prefix="tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f)
        os.replace(tmp, self._state_file)

    def _restore_rungs(self) -> None:
        if self._restored:
            return
        self._restored = True
        path = Path(self._state_file)
        if not path.is_file():
            return
        saved = json.loads(path.read_text())
        for bracket, rungs in zip(self._brackets, saved["rungs"], strict=True):
            scores = {float(m): recorded for m, recorded in rungs}
            for milestone, recorded in bracket._rungs:
                recorded.update(scores.get(float(milestone), {}))
        self._num_stopped = int(saved.get("num_stopped", 0))
