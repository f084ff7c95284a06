"""The orchestrator of ``survey-proc run``: plan, submit, gather, retry, quarantine, record.

It runs the stage list :data:`survey_proc.stages.STAGES` in order (extract, register,
calibrate, crossmatch, forced, classify; each stage module says what it does) and knows no
science: a stage plans its units from the run's state and hands them to the
:class:`~survey_proc.stages.base.StageContext` this module provides, which submits them to
the Dask cluster, gathers the results, retries a failed unit (``--retries``, default 1)
and then quarantines it, recording it in run.json ``failures`` while the rest of the run
goes on; later stages use what exists.

Before the cluster starts, the run's models are loaded once on the driver (a bad file
fails here) and every input is checked; only then is the output directory prepared, so a
refused run writes nothing. Ctrl-C records status ``interrupted``, and an error that stops
the run (not a unit's: those are quarantined) status ``failed`` with the error; the written
units stay and the same command resumes (each stage's done-check skips complete units).
"""

from __future__ import annotations

import platform
import time
import uuid
from pathlib import Path
from typing import Any

from survey_proc import __version__, storage, store
from survey_proc.config import RunConfig
from survey_proc.errors import ConfigError
from survey_proc.outputs import OUTPUT_MARKERS, OutputLayout, clean_temporaries, prepare, write_json_atomic
from survey_proc.stages import STAGES, RunState, StageContext, Submission
from survey_proc.stages.plan import check_reference_overlap, plan_fields, resolve_reference


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"survey_proc": __version__, "python": platform.python_version()}
    for name in ("numpy", "dask", "distributed", "zarr", "xarray", "sep", "astropy", "pyarrow", "pandas", "scipy",
                 "torch"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


class _Bars:
    """One rich progress bar per stage (disabled when progress is off)."""

    def __init__(self, enabled: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), disable=not enabled)

    def __enter__(self) -> _Bars:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def add(self, name: str, total: int, done: int = 0) -> Any:
        return self.progress.add_task(name, total=total, completed=done)

    def advance(self, task: Any) -> None:
        self.progress.advance(task)


class _Runner:
    """Submits units to a Dask client and gathers them: retry, then quarantine, then record."""

    def __init__(self, client: Any, state: RunState, bars: _Bars, max_attempts: int):
        self.client, self.state, self.bars, self.max_attempts = client, state, bars, max_attempts

    def submit(self, fn: Any, *args: Any, key: str | None = None) -> Any:
        return self.client.submit(fn, *args, key=key, pure=False)

    def _start(self, unit: Submission, attempt: int) -> Any:
        return unit.start(attempt) if unit.start is not None else self.submit(unit.fn, *unit.args)

    def gather(self, stage: str, units: list[Submission], on_result: Any, bar: Any) -> None:
        """Wait for every unit; ``on_result(key, result)`` on success.

        A unit that fails is submitted again until it has been tried ``max_attempts`` times;
        after that it is quarantined: recorded in ``state.failures`` (stage, unit key, last
        error, attempts). A unit that succeeded only on a retry is recorded in
        ``state.retried`` with the errors of its failed attempts.
        """
        from distributed import as_completed

        futures: dict[Any, tuple[Submission, int, list[str]]] = {self._start(u, 1): (u, 1, []) for u in units}
        pending = as_completed(list(futures))
        for fut in pending:
            unit, attempt, errors = futures.pop(fut)
            try:
                on_result(unit.key, fut.result())
            except Exception as exc:  # a failed unit must not stop the run
                error = f"{type(exc).__name__}: {exc}"
                fut.release()
                if attempt < self.max_attempts:
                    retry = self._start(unit, attempt + 1)
                    futures[retry] = (unit, attempt + 1, [*errors, error])
                    pending.add(retry)
                    continue
                self.state.failures.append({"stage": stage, **unit.key, "error": error, "attempts": attempt})
            else:
                fut.release()
                if attempt > 1:
                    self.state.retried.append({"stage": stage, **unit.key, "attempts": attempt, "errors": errors})
            if bar is not None:
                self.bars.advance(bar)


def required_models(cfg: RunConfig) -> dict[str, str | None]:
    """Model kind -> weights path (None: the shipped weights) of the models this run uses."""
    from survey_proc.detect.registry import detector_class, weights_path

    models: dict[str, str | None] = {}
    kind = detector_class(cfg.detector).model_kind
    if kind:
        models[kind] = weights_path(cfg)
    if cfg.bpnn.enabled:
        models["bpnn"] = cfg.bpnn.weights or None
    if cfg.classify.enabled:
        models["classifier"] = cfg.classify.weights or None
        if cfg.classify.sparse_span_days > 0:
            models["classifier_sparse"] = cfg.classify.sparse_weights or None
    return models


def check_models(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Load the run's models once on the driver (a bad file fails here, before the cluster).

    Returns kind -> {path, sha256, threshold or n_samples, card summary} for run.json and
    the fingerprint; a threshold or sample count set in the configuration replaces the card's.
    """
    from survey_proc import model_registry

    models = {kind: model_registry.describe(kind, path) for kind, path in required_models(cfg).items()}
    overrides = {"detector": ("threshold", cfg.pnet.threshold), "bpnn": ("n_samples", cfg.bpnn.n_samples),
                 "classifier": ("threshold", cfg.classify.threshold)}
    for kind, entry in models.items():
        name, value = overrides.get(kind, ("", 0))
        if value:
            entry[name] = value
    return models


def run_pipeline(cfg: RunConfig, client: Any = None) -> dict[str, Any]:
    """Run every stage for ``cfg``; returns the run.json content (also written to ``OUT/run.json``).

    Parameters
    ----------
    cfg
        A validated run configuration with ``store`` and ``out`` set.
    client
        An existing Dask client (tests, notebooks); None starts/attaches the cluster ``cfg`` names.
    """
    from survey_proc.distributed.cluster import make_client

    t_all = time.perf_counter()
    if not cfg.store or not cfg.out:
        raise ConfigError("a run needs a store and an --out directory")
    store.validate_store(cfg.store, epoch_checks=False)  # an epoch without a time is left out, not the run
    models = check_models(cfg)
    classifiers = ("classifier", "classifier_sparse")
    fp = cfg.fingerprint(models={k: v["sha256"] for k, v in models.items() if k not in classifiers})
    # the classifiers' cards are part of their input too (p_periodic calibration, threshold): a new card reclassifies
    cfp = (cfg.classify_fingerprint(fp, "".join(models[k]["sha256"] + models[k].get("card_sha256", "")
                                                for k in classifiers if k in models))
           if "classifier" in models else None)
    reference = resolve_reference(cfg)
    plans = plan_fields(cfg)
    if reference is not None:
        check_reference_overlap(reference, plans)
    # only after every input check: a refused run writes nothing
    prepare(cfg.out, cfg.mode, fp, owned=sorted({*OUTPUT_MARKERS, *(u.top for s in STAGES for u in s.writes)}))
    clean_temporaries(cfg.out)
    layout = OutputLayout(cfg.out)
    state = RunState()
    run = {"status": "running", "started_unix": time.time(), "config": cfg.to_dict(), "fingerprint": fp,
           "classify_fingerprint": cfp,
           "versions": _versions(), "models": models,
           "store": cfg.store if storage.is_remote(cfg.store) else str(Path(cfg.store).resolve()),
           "reference_catalog": str(reference) if reference else None,
           "fields": {p.field: {"epochs": p.n_epochs, "shape": [p.ny, p.nx], "blocks_per_epoch": len(p.blocks),
                                "tiles_per_epoch": sum(len(b[0]) for b in p.blocks), "regions": len(p.regions)}
                      for p in plans}}
    write_json_atomic(run, layout.run_json)
    run_token = uuid.uuid4().hex[:8]

    def stages(c: Any) -> None:
        needed = required_models(cfg)
        if needed:
            from survey_proc.distributed.plugins import ModelPlugin

            c.register_plugin(ModelPlugin(needed))
        with _Bars(cfg.progress) as bars:
            runner = _Runner(c, state, bars, cfg.retries + 1)
            ctx = StageContext(cfg, plans, reference, fp, cfp, state, run_token, runner.gather, runner.submit, bars)
            for stage in STAGES:
                if stage.enabled(ctx):
                    t = time.perf_counter()
                    stage.run(ctx)
                    state.timings[f"{stage.name}_s"] = time.perf_counter() - t

    t = time.perf_counter()
    try:
        if client is not None:
            state.timings["cluster_start_s"] = 0.0
            stages(client)
        else:
            with make_client(cfg.cluster, scheduler=cfg.scheduler, workers=cfg.workers,
                             threads_per_worker=cfg.threads_per_worker, quiet=not cfg.progress) as c:
                state.timings["cluster_start_s"] = time.perf_counter() - t
                stages(c)
    except BaseException as exc:  # Ctrl-C, or a stage that could not go on: record what was done, then stop
        state.timings["total_s"] = time.perf_counter() - t_all
        run.update(state.summary(plans))
        if isinstance(exc, KeyboardInterrupt):  # the written units stay and a re-run resumes
            run["status"] = "interrupted"
        else:
            run["status"] = "failed"
            run["error"] = f"{type(exc).__name__}: {exc}"
        write_json_atomic(run, layout.run_json)
        raise
    clean_temporaries(cfg.out)  # a worker killed while writing leaves its temporary file behind
    state.timings["total_s"] = time.perf_counter() - t_all
    run.update(state.summary(plans))
    run["status"] = "complete" if not state.failures else "incomplete"
    write_json_atomic(run, layout.run_json)
    return run
