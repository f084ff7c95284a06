"""What a stage is: its output unit, its done-check, its config sections, its tasks and its driver-side plan.

A stage module (``survey_proc/stages/<name>.py``) defines one :class:`Stage` subclass and
an instance of it. The orchestrator (:mod:`survey_proc.distributed.pipeline`) runs the
stage list (:data:`survey_proc.stages.STAGES`) in order, calling :meth:`Stage.run` with a
:class:`StageContext`; the stage decides which units to submit (its plan, driver side) and
the context submits them, gathers the results, retries failed units and quarantines them
after their last attempt, records everything in the :class:`RunState` and advances the
progress bar. Stages know no Dask; task functions (the ``*_task`` functions of a stage
module) run on the workers, take paths and small arguments, read their own inputs, write
their own unit atomically and return its record.

Adding a stage is one new module plus one entry in :data:`survey_proc.stages.STAGES`.

Every task function is wrapped in :func:`worker_task`: it computes with denormal floats
flushed to zero (the models' near-zero activations are slow as denormals on x86), and puts
the thread's floating-point mode back when it returns. The mode is per thread and a new
thread inherits its creator's, so setting it once when a model was loaded (as before) left
the mode of a task to the history of its thread, and leaked into the caller's process when
a task ran in-process (a test or a notebook: hypothesis then refuses subnormal floats).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, ParamSpec, TypeVar

import pyarrow as pa

from survey_proc import storage
from survey_proc.config import RunConfig, config_from_json
from survey_proc.outputs import read_meta
from survey_proc.stages.plan import FieldPlan
from survey_proc.stages.state import RunState
from survey_proc.storage import Location


@dataclass(frozen=True)
class OutputUnit:
    """One unit of a stage's output: a Parquet file per key, written atomically with its record in the footer.

    Attributes
    ----------
    template
        Path relative to the output directory, formatted with the unit's key
        (e.g. ``"sources/field={field}/epoch={epoch}.parquet"``).
    schema
        The contract's Arrow schema of the file (``survey_proc.catalog.schema``), or None
        for an addition outside the contract.
    """

    template: str
    schema: pa.Schema | None

    def path(self, out: Location, **key: Any) -> Location:
        """The unit's file for ``key`` (e.g. ``field="F000", epoch=3``) under ``out`` (a directory or a URL)."""
        return storage.join(out, self.template.format(**key))

    @property
    def top(self) -> str:
        """The top-level name under OUT the unit lives in (what ``--overwrite`` removes)."""
        return self.template.split("/", 1)[0]

    def record(self, out: Location, **key: Any) -> dict[str, Any] | None:
        """The record in the unit's footer (None: missing or unreadable)."""
        return read_meta(self.path(out, **key))


@dataclass
class Submission:
    """A unit for the context to submit: its key (for run.json), the task and its arguments."""

    key: dict[str, Any]
    fn: Callable[..., Any] | None = None
    args: tuple[Any, ...] = ()
    # submits the unit itself, for every attempt (argument: the attempt number), when one unit is a chain of
    # tasks (extraction: blocks, then the epoch); None: the task ``fn(*args)`` is submitted
    start: Callable[[int], Any] | None = None


class StageContext:
    """What a stage's plan gets from the orchestrator.

    Attributes
    ----------
    cfg, plans, reference, fingerprint, classify_fingerprint, state, run_token
        The run's configuration, field plans, reference catalogue (None: relative
        calibration), configuration fingerprints, state and a token unique to this run
        (part of task keys).
    cfg_json
        The configuration as JSON, the form tasks take it in (:func:`task_config`).
    """

    def __init__(self, cfg: RunConfig, plans: list[FieldPlan], reference: Location | None, fingerprint: str,
                 classify_fingerprint: str | None, state: RunState, run_token: str,
                 gather: Callable[..., None], submit: Callable[..., Any], bars: Any):
        self.cfg = cfg
        self.plans = plans
        self.reference = reference
        self.fingerprint = fingerprint
        self.classify_fingerprint = classify_fingerprint
        self.state = state
        self.run_token = run_token
        self.cfg_json = json.dumps(cfg.to_dict())
        self._gather = gather
        self.submit = submit  # submit(fn, *args, key=None) -> future (for stages that chain tasks)
        self._bars = bars

    def bar(self, name: str, total: int, done: int = 0) -> Any:
        """A progress bar for ``name`` with ``total`` steps, ``done`` of them already."""
        return self._bars.add(name, total, done)

    def advance(self, bar: Any) -> None:
        """Advance ``bar`` by one step."""
        self._bars.advance(bar)

    def map(self, stage: str, units: Iterable[Submission], on_result: Callable[[dict, Any], None],
            bar: Any = None) -> None:
        """Submit ``units``, call ``on_result(key, result)`` for each success; retry, then quarantine, failures."""
        self._gather(stage, list(units), on_result, bar)


class Stage:
    """A stage of ``survey-proc run``; subclasses set the class attributes and implement :meth:`run`.

    Attributes
    ----------
    name
        The stage's name (progress bar, run.json ``timings_s`` key ``<name>_s``, failures).
    unit
        The output unit the stage writes or rewrites, one per task.
    also_writes
        Other units it writes (``--overwrite`` removes them with the rest).
    config_sections
        The sections of :class:`~survey_proc.config.RunConfig` the stage reads.
    """

    name: ClassVar[str]
    unit: ClassVar[OutputUnit]
    also_writes: ClassVar[tuple[OutputUnit, ...]] = ()
    config_sections: ClassVar[tuple[str, ...]]

    @property
    def writes(self) -> tuple[OutputUnit, ...]:
        """Every unit the stage writes."""
        return (self.unit, *self.also_writes)

    def enabled(self, ctx: StageContext) -> bool:
        """Whether the stage runs in this run (default: always)."""
        return True

    def done(self, ctx: StageContext, **key: Any) -> dict[str, Any] | None:
        """The unit's record when it is complete for this run (resume skips it), else None."""
        rec = self.unit.record(ctx.cfg.out, **key)
        return rec if rec is not None and rec.get("fingerprint") == ctx.fingerprint else None

    def run(self, ctx: StageContext) -> None:
        """Plan the stage's units from ``ctx.state`` and have ``ctx`` run them."""
        raise NotImplementedError


@functools.lru_cache(maxsize=8)
def task_config(cfg_json: str) -> RunConfig:
    """The run configuration a task was given as JSON (parsed once per worker process)."""
    return config_from_json(json.loads(cfg_json))


def _flushing_denormals() -> bool:
    """Whether this thread flushes denormal floats to zero (FTZ/DAZ) now."""
    import numpy as np

    with np.errstate(under="ignore"):
        return bool(np.float64(1e-310) * np.float64(1.0) == 0.0)


@contextmanager
def denormals_flushed() -> Iterator[None]:
    """Compute with denormal floats flushed to zero in this thread; the previous mode is restored after."""
    import torch

    was = _flushing_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if not was:
            torch.set_flush_denormal(False)


_P = ParamSpec("_P")
_R = TypeVar("_R")


def worker_task(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Mark ``fn`` as a stage's task: it runs with denormals flushed (:func:`denormals_flushed`)."""
    @functools.wraps(fn)
    def task(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with denormals_flushed():
            return fn(*args, **kwargs)

    return task
