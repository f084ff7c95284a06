"""Detectors: the classical baseline (sep) and the learned one (PNet).

:mod:`~survey_proc.detect.base` says what a detector is (the :class:`Detector` protocol);
:mod:`~survey_proc.detect.sep_detector` and :mod:`~survey_proc.detect.pnet_detector`
implement it on :mod:`~survey_proc.detect.classical` (sep) and
:mod:`~survey_proc.detect.pnet` (the network); :mod:`~survey_proc.detect.registry` maps
a detector's name to its class.
"""
