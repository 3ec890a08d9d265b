"""The run's Optuna study: its sampler, and the settings every worker of the run shares.

The first worker to create the study stores the run's settings (baseline, budgets) and the
sensitivity pre-pass in the study's user attributes; workers that join later, on this or
another machine, adopt them, so that every trial of the study means the same thing.
"""

import os
import time
import warnings
from pathlib import Path

import optuna

from autocomp.core.errors import AutocompError
from autocomp.search.config import SAMPLERS
from autocomp.search.settings import RunSettings, check_resumable
from autocomp.search.storage import open_storage

DIRECTIONS = ["maximize", "minimize", "minimize"]  # val accuracy, latency ms, deployed bytes
# How long a joining worker waits for the creator to store the shared settings.
SETTINGS_WAIT_S = 60.0


def make_sampler(name: str, seed: int, trials: int) -> optuna.samplers.BaseSampler:
    """The sampler named by ``--sampler``, every setting explicit (Optuna 5 changed defaults).

    Both model-based samplers read the budgets from the constraints each trial stores.
    The start-up phase is sized to the run, so a short search still reaches the model.
    """
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                          constant_liar=True, n_startup_trials=max(4, min(10, trials // 3)))
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(6, min(50, trials // 3)))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise AutocompError(f"unknown sampler {name!r} (choose from {', '.join(SAMPLERS)})")


def _sampler_for(storage: optuna.storages.BaseStorage, settings: RunSettings) -> optuna.samplers.BaseSampler:
    """The run's sampler, its seed offset by the trials already stored, so that a resumed
    run does not replay the random samples drawn before, and on a shared storage by the
    process id, so that workers started together do not draw the same samples."""
    stored = 0
    if any(s.study_name == settings.name for s in storage.get_all_studies()):
        stored = storage.get_n_trials(storage.get_study_id_from_name(settings.name))
    worker = os.getpid() if settings.storage else 0
    return make_sampler(settings.sampler, settings.seed + stored + worker, settings.trials)


def shared_state(settings: RunSettings, run_dir: Path) -> dict | None:
    """The study's shared settings and pre-pass results when the study exists, else None."""
    storage = open_storage(settings.storage, run_dir)
    if not any(s.study_name == settings.name for s in storage.get_all_studies()):
        return None
    study = optuna.load_study(study_name=settings.name, storage=storage)
    deadline = time.monotonic() + SETTINGS_WAIT_S
    while "settings" not in study.user_attrs:
        if time.monotonic() > deadline:
            raise AutocompError(f"study {settings.name!r} exists but its creator never stored the run "
                                "settings (it was killed while starting?): pick a new --name")
        time.sleep(1.0)
    return dict(study.user_attrs)


def create_study(settings: RunSettings, run_dir: Path, shared: dict) -> tuple[optuna.Study, bool]:
    """Create the run's study with ``shared`` stored in it; when another worker created it
    first, open theirs instead. Returns the study and whether this worker created it."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = open_storage(settings.storage, run_dir)
    try:
        study = optuna.create_study(study_name=settings.name, storage=storage, directions=DIRECTIONS,
                                    sampler=_sampler_for(storage, settings), load_if_exists=False)
    except optuna.exceptions.DuplicatedStudyError:
        return open_study(run_dir, settings), False
    for key, value in shared.items():
        study.set_user_attr(key, value)
    return study, True


def adopt(settings: RunSettings, shared: dict) -> RunSettings:
    """This invocation's settings with the study's baseline, after checking that nothing
    that changes the meaning of its trials differs."""
    saved = RunSettings.from_json({**shared["settings"], "storage": settings.storage})
    check_resumable(saved, settings)
    settings.baseline = saved.baseline
    return settings


def open_study(run_dir: Path, settings: RunSettings) -> optuna.Study:
    """An existing run's study."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = open_storage(settings.storage, run_dir)
    try:
        return optuna.load_study(study_name=settings.name, storage=storage,
                                 sampler=_sampler_for(storage, settings))
    except KeyError:
        raise AutocompError(f"no study named {settings.name!r} in its storage") from None


def shared_settings_json(settings: RunSettings) -> dict:
    """The settings stored in the study: everything but the storage URL (it may hold a password)."""
    data = settings.to_json()
    data.pop("storage", None)
    return data
