"""The stages of ``survey-proc run``, one module each, run in the order of :data:`STAGES`.

A stage declares its output unit (path template and schema), its done-check for resume,
the configuration sections it reads, its per-unit tasks and its driver-side plan
(:class:`survey_proc.stages.base.Stage`). The orchestrator
(:mod:`survey_proc.distributed.pipeline`) runs this list and knows no science; adding a
stage is one module plus one entry here. docs/pipeline.md lists the same stages (a test
checks they agree).
"""

from __future__ import annotations

from survey_proc.stages.base import OutputUnit, Stage, StageContext, Submission
from survey_proc.stages.calibrate import CalibrateStage
from survey_proc.stages.classify import ClassifyStage
from survey_proc.stages.crossmatch import CrossmatchStage
from survey_proc.stages.extract import ExtractStage
from survey_proc.stages.forced import ForcedStage
from survey_proc.stages.register import RegisterStage
from survey_proc.stages.state import RunState

STAGES: tuple[Stage, ...] = (ExtractStage(), RegisterStage(), CalibrateStage(), CrossmatchStage(), ForcedStage(),
                             ClassifyStage())

__all__ = ["STAGES", "OutputUnit", "RunState", "Stage", "StageContext", "Submission"]
