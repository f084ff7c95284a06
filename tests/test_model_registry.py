"""The model registry: save/load round trips, the shipped (legacy) files, digests, errors, run.json entries,
the device rule and the worker plugin's per-kind loading."""

from __future__ import annotations

import hashlib
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from survey_proc import model_registry as mr
from survey_proc.detect import pnet
from survey_proc.errors import SurveyProcError
from survey_proc.lightcurves import classifier as C
from survey_proc.lightcurves import sparse_classifier as sc
from survey_proc.photometry import bpnn as bp
from survey_proc.photometry import stamps as stp

# the shipped weights: their digests are part of every run's fingerprint and must never change
SHIPPED_DIGESTS = {"detector": "d61c5020fe32b8c9", "bpnn": "584032c7fa35c363", "classifier": "5468d5a4421793c3",
                   "classifier_sparse": "db88d9f80b342ff6"}  # v4 (two views, bands rescaled), 2026-12-01
# today's values of the shipped settings (detector and bpnn: in the weights file; classifier: on its card)
SHIPPED_SETTINGS = {"detector": ("threshold", 0.14), "bpnn": ("n_samples", 8),
                    "classifier": ("threshold", 0.500000000000004),  # calibrated p_periodic 0.5 (raw 0.99827)
                    "classifier_sparse": ("threshold", 0.96)}


def _tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "detector":
        return pnet.PNet(pnet.PNetConfig(channels=(8, 8, 12, 16), stem_channels=8, head_channels=8)).eval()
    if kind == "bpnn":
        return bp.BPNN(bp.BPNNConfig(channels=8, n_blocks=1, bottleneck=16, hidden=(8,))).eval()
    if kind == "classifier_sparse":
        return sc.FourierMLP(sc.SparseClassifierConfig(hidden=(8,))).eval()
    return C.LocalGlobalCNN(C.ClassifierConfig(global_channels=(4,), local_channels=(4,), hidden=(8,))).eval()


SETTINGS = {"detector": {"threshold": 0.42}, "bpnn": {"n_samples": 12}, "classifier": {"threshold": 0.7},
            "classifier_sparse": {"threshold": 0.6}}


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("kind", mr.KINDS)
def test_save_and_load_round_trip(kind, tmp_path):
    model = _tiny(kind)
    path = tmp_path / f"{kind}.pt"
    mr.save(kind, model, path, card={"hello": 1}, **SETTINGS[kind])
    blob = torch.load(path, map_location="cpu", weights_only=True)
    assert blob["format"] == mr.FORMAT == 1 and blob["kind"] == kind
    (name, value), = SETTINGS[kind].items()
    assert blob[name] == value
    assert json.loads(path.with_suffix(".json").read_text()) == {"hello": 1}
    loaded = mr.load(kind, path, device="cpu")
    assert getattr(loaded, name) == value and type(getattr(loaded, name)) is type(value)
    assert loaded.card == {"hello": 1} and loaded.path == str(path) and loaded.device == torch.device("cpu")
    assert loaded.model.cfg == model.cfg and not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_a_loaded_detector_gives_the_saved_models_outputs(tmp_path):
    model = _tiny("detector")
    mr.save("detector", model, tmp_path / "d.pt", card={}, threshold=0.3)
    det = mr.load("detector", tmp_path / "d.pt", device="cpu")  # BatchNorm folded, channels-last
    x = torch.randn(1, 1, 32, 32)
    with torch.inference_mode():
        ref, out = model(x), det.model(x.contiguous(memory_format=torch.channels_last))
    for k in ("heatmap", "offset", "flux"):
        torch.testing.assert_close(out[k], ref[k], atol=1e-4, rtol=1e-4)


def test_a_loaded_bpnn_predicts_reproducibly_with_its_saved_t(tmp_path):
    mr.save("bpnn", _tiny("bpnn"), tmp_path / "m.pt", card={}, n_samples=12)
    loaded = mr.load("bpnn", tmp_path / "m.pt", device="cpu")
    st = stp.Stamps(np.random.default_rng(0).normal(size=(4, 3, 9, 9)).astype(np.float32),
                    np.zeros((4, len(stp.AUX_NAMES)), np.float32), np.ones(4), np.zeros(4, bool), 1)
    a = bp.predict(loaded, st, seed=5)
    b = bp.predict(loaded, st, seed=5)
    np.testing.assert_array_equal(a.mu, b.mu)
    assert (a.sigma_epistemic > 0).all() and np.allclose(a.sigma**2, a.sigma_aleatoric**2 + a.sigma_epistemic**2)


def test_save_refuses_another_kinds_model_and_wrong_settings(tmp_path):
    with pytest.raises(SurveyProcError, match=r"save\('bpnn'\) needs a BPNN, got a PNet"):
        mr.save("bpnn", _tiny("detector"), tmp_path / "x.pt", card={}, n_samples=4)
    with pytest.raises(SurveyProcError, match=r"save\('classifier'\) takes the settings \['threshold'\], got \[\]"):
        mr.save("classifier", _tiny("classifier"), tmp_path / "x.pt", card={})
    with pytest.raises(SurveyProcError, match=r"takes the settings \['n_samples'\], got \['threshold'\]"):
        mr.save("bpnn", _tiny("bpnn"), tmp_path / "x.pt", card={}, threshold=0.5)
    with pytest.raises(SurveyProcError,
                       match=r"unknown model kind 'pnet'; the kinds are detector, bpnn, classifier, classifier_sparse"):
        mr.save("pnet", _tiny("detector"), tmp_path / "x.pt", card={}, threshold=0.5)
    assert not (tmp_path / "x.pt").exists()


def test_settings_come_from_the_weights_file_else_the_card_else_the_default(tmp_path):
    path = tmp_path / "c.pt"
    mr.save("classifier", _tiny("classifier"), path, card={"threshold": 0.8}, threshold=0.6)
    assert mr.load("classifier", path, device="cpu").threshold == 0.6  # the weights file wins
    blob = torch.load(path, map_location="cpu", weights_only=True)
    del blob["threshold"]
    torch.save(blob, path)
    assert mr.load("classifier", path, device="cpu").threshold == 0.8  # then the card
    path.with_suffix(".json").unlink()
    loaded = mr.load("classifier", path, device="cpu")
    assert loaded.threshold == mr.DEFAULT_SETTINGS["threshold"] == 0.5 and loaded.card == {}


# ------------------------------------------------------------------ the shipped (legacy) files


@pytest.mark.parametrize("kind", mr.KINDS)
def test_shipped_weights_load_with_todays_settings(kind):
    path = mr.default_weights(kind)
    assert path.name == f"{kind}.pt" and path.is_file()
    loaded = mr.load(kind, device="cpu")
    name, value = SHIPPED_SETTINGS[kind]
    assert getattr(loaded, name) == value and loaded.path == str(path)
    assert loaded.card["date"] and loaded.card.get("model")


def test_the_legacy_files_are_read_as_they_are():
    """detector.pt has a format but no kind; classifier.pt has neither: both are identified by their config."""
    det = torch.load(mr.default_weights("detector"), map_location="cpu", weights_only=True)
    clf = torch.load(mr.default_weights("classifier"), map_location="cpu", weights_only=True)
    bpn = torch.load(mr.default_weights("bpnn"), map_location="cpu", weights_only=True)
    assert det["format"] == 1 and "kind" not in det
    assert "format" not in clf and "kind" not in clf and "threshold" not in clf
    assert bpn["format"] == 1 and bpn["kind"] == "bpnn"


@pytest.mark.parametrize("kind", mr.KINDS)
def test_digest_is_the_first_16_hex_digits_of_the_sha256(kind, tmp_path):
    path = mr.default_weights(kind)
    full = hashlib.sha256(path.read_bytes()).hexdigest()
    assert mr.digest(kind, None) == mr.digest(kind, "") == mr.digest(kind, path) == full[:16]
    assert mr.digest(kind, None) == SHIPPED_DIGESTS[kind]  # the shipped files are never rewritten
    other = tmp_path / "other.pt"
    shutil.copy(path, other)
    assert mr.digest("detector", str(other)) == full[:16]  # a given file's digest does not depend on the kind


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("kind, missing, corrupt", [
    ("detector", r"PNet weights not found at .*nope\.pt: reinstall.*train_detector",
     r"PNet weights file .*bad\.pt is corrupt or not a PNet model \(UnpicklingError"),
    ("bpnn", r"BPNN weights not found at .*nope\.pt: reinstall.*train_bpnn",
     r"BPNN weights file .*bad\.pt is corrupt or not a BPNN model"),
    ("classifier", r"classifier weights not found at .*nope\.pt: reinstall.*train_classifier",
     r"classifier weights file .*bad\.pt is corrupt or not a classifier model"),
])
def test_missing_and_corrupt_files_are_reported(kind, missing, corrupt, tmp_path):
    with pytest.raises(SurveyProcError, match=missing):
        mr.load(kind, tmp_path / "nope.pt")
    with pytest.raises(SurveyProcError, match=missing):
        mr.digest(kind, tmp_path / "nope.pt")
    with pytest.raises(SurveyProcError, match="weights not found at "):
        mr.load(kind, tmp_path)  # a directory is not a weights file
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(SurveyProcError, match=corrupt):
        mr.load(kind, bad)


def test_files_that_are_not_weights_dictionaries_are_reported(tmp_path):
    path = tmp_path / "t.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(SurveyProcError, match=r"t\.pt is corrupt or not a BPNN model \(ValueError: not a "
                                              r"survey-proc weights file"):
        mr.load("bpnn", path)
    mr.save("bpnn", _tiny("bpnn"), path, card={}, n_samples=4)
    blob = torch.load(path, map_location="cpu", weights_only=True)
    torch.save(blob | {"format": 2}, path)
    with pytest.raises(SurveyProcError, match=r"\(ValueError: format 2 is not supported"):
        mr.load("bpnn", path)
    torch.save(blob | {"state_dict": {}}, path)
    with pytest.raises(SurveyProcError, match=r"not a BPNN model \(RuntimeError: Error\(s\) in loading state_dict"):
        mr.load("bpnn", path)
    with pytest.raises(SurveyProcError, match=r"unknown model kind 'pnet'"):
        mr.load("pnet", path)


def test_weights_of_another_kind_are_refused(tmp_path):
    with pytest.raises(SurveyProcError, match=r"BPNN weights file .*detector\.pt is not a BPNN model: it holds a "
                                              r"'detector' model \(a legacy file without a 'kind' key"):
        mr.load("bpnn", mr.default_weights("detector"))
    with pytest.raises(SurveyProcError, match=r"PNet weights file .*classifier\.pt is not a PNet model: it holds a "
                                              r"'classifier' model \(a legacy file"):
        mr.load("detector", mr.default_weights("classifier"))
    with pytest.raises(SurveyProcError, match=r"classifier weights file .*bpnn\.pt is not a classifier model: it "
                                              r"holds a 'bpnn' model; pass classifier weights or retrain"):
        mr.load("classifier", mr.default_weights("bpnn"))
    path = tmp_path / "d.pt"
    mr.save("detector", _tiny("detector"), path, card={}, threshold=0.2)
    with pytest.raises(SurveyProcError, match=r"not a BPNN model: it holds a 'detector' model; pass bpnn weights"):
        mr.load("bpnn", path)


# ------------------------------------------------------------------ run.json entries


def test_describe_gives_the_run_json_entry_of_each_shipped_model():
    cards = {k: json.loads(mr.default_weights(k).with_suffix(".json").read_text()) for k in mr.KINDS}
    common = {k: {"path": str(mr.default_weights(k)), "sha256": SHIPPED_DIGESTS[k],
                  "card_sha256": mr.card_digest(k, None)} for k in mr.KINDS}
    expected = {
        "detector": common["detector"] | {"threshold": 0.14, "trained": cards["detector"]["date"],
                                          "git_revision": cards["detector"]["git_revision"],
                                          "validation_best": cards["detector"]["validation"]["best"]},
        "bpnn": common["bpnn"] | {"n_samples": 8, "trained": cards["bpnn"]["date"],
                                  "git_revision": cards["bpnn"]["git_revision"],
                                  "validation": cards["bpnn"]["validation"]},
        "classifier": common["classifier"] | {"threshold": SHIPPED_SETTINGS["classifier"][1],
                                              "trained": cards["classifier"]["date"],
                                              "git_revision": cards["classifier"]["git_revision"],
                                              "validation_threshold": cards["classifier"]["validation"]["threshold"]},
        "classifier_sparse": common["classifier_sparse"] | {
            "threshold": SHIPPED_SETTINGS["classifier_sparse"][1], "trained": cards["classifier_sparse"]["date"],
            "git_revision": cards["classifier_sparse"]["git_revision"],
            "validation": cards["classifier_sparse"]["validation"]},
    }
    for kind in mr.KINDS:
        got = mr.describe(kind, None)
        assert got == expected[kind] and list(got) == list(expected[kind]), kind
        assert mr.describe(kind, str(mr.default_weights(kind))) == got


def test_describe_of_a_model_without_a_card(tmp_path):
    path = tmp_path / "b.pt"
    mr.save("bpnn", _tiny("bpnn"), path, card={}, n_samples=3)
    path.with_suffix(".json").unlink()
    assert mr.describe("bpnn", path) == {"path": str(path), "sha256": mr.digest("bpnn", path), "card_sha256": "",
                                         "n_samples": 3, "trained": None, "git_revision": None, "validation": None}


def test_the_card_digest_follows_the_card(tmp_path):
    """The classify fingerprint takes the card (calibration, threshold): a new card must give a new digest."""
    path = tmp_path / "c.pt"
    mr.save("classifier", _tiny("classifier"), path, card={"calibration": None}, threshold=0.5)
    before = mr.card_digest("classifier", path)
    assert len(before) == 16 and before == mr.card_digest("classifier", path)
    path.with_suffix(".json").write_text(json.dumps({"calibration": {"method": "isotonic"}}))
    assert mr.card_digest("classifier", path) not in ("", before)
    assert mr.digest("classifier", path) == mr.digest("classifier", path)  # the weights' digest is unchanged


# ------------------------------------------------------------------ device rule


def test_one_device_rule_for_every_kind(monkeypatch):
    assert mr.choose_device("cpu") == torch.device("cpu")
    assert mr.choose_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert mr.choose_device(None) == mr.choose_device("") == torch.device("cpu")
    for kind in mr.KINDS:
        assert mr.load(kind).device == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert mr.choose_device(None) == torch.device("cuda")
    assert mr.choose_device("cpu") == torch.device("cpu")  # an explicit device always wins


# ------------------------------------------------------------------ the worker plugin


def test_the_plugin_loads_only_the_kinds_a_run_needs_and_workers_reuse_them(monkeypatch, tmp_path):
    import distributed

    from survey_proc.distributed import plugins

    other = tmp_path / "classifier.pt"
    shutil.copy(mr.default_weights("classifier"), other)
    plugin = plugins.ModelPlugin({"classifier": None, "bpnn": str(mr.default_weights("bpnn"))}, device="cpu")
    worker = SimpleNamespace(plugins={plugins.PLUGIN_NAME: plugin},
                             state=SimpleNamespace(nthreads=torch.get_num_threads()))
    monkeypatch.setattr(distributed, "get_worker", lambda: worker)
    before = dict(plugins.LOADS)
    plugin.setup(worker)
    assert set(plugin.models) == {"classifier", "bpnn"}
    assert plugins.LOADS == before | {"classifier": before["classifier"] + 1, "bpnn": before["bpnn"] + 1}
    held = plugin.models["classifier"]
    assert plugins.worker_model("classifier") is held
    assert plugins.worker_model("classifier", str(mr.default_weights("classifier"))) is held  # the same file
    assert plugins.worker_model("bpnn", None) is plugin.models["bpnn"]
    # other weights than the plugin's: loaded once per process
    a = plugins.worker_model("classifier", other)
    assert a is not held and plugins.worker_model("classifier", str(other)) is a and a.path == str(other)
    assert plugins.LOADS["classifier"] == before["classifier"] + 2
    plugin.teardown(worker)
    assert plugin.models == {}


def test_the_plugin_refuses_unknown_kinds():
    from survey_proc.distributed.plugins import ModelPlugin, worker_model

    with pytest.raises(SurveyProcError, match="unknown model kind 'pnet'"):
        ModelPlugin({"pnet": None})
    with pytest.raises(SurveyProcError, match="unknown model kind 'sep'"):
        worker_model("sep")
    assert ModelPlugin({"detector": ""}).paths == {"detector": None}
