"""The GPU code path on a CPU machine: out-of-memory back-off and the cuda cluster's error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from survey_proc.gpu_memory import is_oom


class _OOMAbove:
    """Wraps a model: a batch larger than ``limit`` raises CUDA's out-of-memory error."""

    def __init__(self, model, limit: int, attr: str = "forward"):
        self.model, self.limit, self.calls = model, limit, []

    def __getattr__(self, name):  # everything else is the wrapped model's
        return getattr(self.model, name)

    def __call__(self, x, *args, **kw):
        self.calls.append(len(x))
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(x, *args, **kw)


def test_is_oom_recognises_cuda_out_of_memory_only():
    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert not is_oom(RuntimeError("shape mismatch")) and not is_oom(ValueError("out of memory"))


def test_pnet_halves_its_batch_on_out_of_memory_and_gives_the_same_detections():
    from survey_proc import model_registry
    from survey_proc.detect import pnet

    det = model_registry.load("detector", None, device="cpu")
    rng = np.random.default_rng(0)
    imgs = rng.normal(0, 1, (4, 64, 64)).astype(np.float32)
    imgs[:, 30:33, 30:33] += 40.0
    ref = pnet.predict(det, imgs)
    wrapped = _OOMAbove(det.model, 1)
    det.model, original = wrapped, det.model
    try:
        out = pnet.predict(det, imgs)
        assert wrapped.calls[:3] == [4, 2, 1]  # 4 -> 2 -> 1 ...
        for a, b in zip(ref, out, strict=True):
            np.testing.assert_allclose(a.x, b.x, atol=1e-5)
            np.testing.assert_allclose(a.flux, b.flux, rtol=1e-5)
        wrapped.limit = 0  # not even one tile fits
        with pytest.raises(Exception, match=r"tile does not fit in the GPU's memory; use a smaller --tile-px"):
            pnet.predict(det, imgs[:1])
    finally:
        det.model = original


def test_bpnn_halves_its_batch_on_out_of_memory():
    from survey_proc import model_registry
    from survey_proc.photometry import bpnn as bp
    from survey_proc.photometry.stamps import AUX_NAMES, STAMP_PX, Stamps

    loaded = model_registry.load("bpnn", None, device="cpu")
    rng = np.random.default_rng(1)
    n = 40
    st = Stamps(rng.normal(0, 0.1, (n, 3, STAMP_PX, STAMP_PX)).astype(np.float32),
                rng.normal(0, 1, (n, len(AUX_NAMES))).astype(np.float32), np.ones(n), np.zeros(n, bool), 1)
    ref = bp.predict(loaded, st, n_samples=0, seed=0)
    feats = loaded.model.features
    sizes = []

    def oom_features(px, ax):
        sizes.append(len(px))
        if len(px) > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return feats(px, ax)

    loaded.model.features = oom_features
    try:
        out = bp.predict(loaded, st, n_samples=0, seed=0, max_batch=32)
    finally:
        loaded.model.features = feats
    assert sizes[:3] == [32, 16, 8] and max(sizes[3:]) <= 8
    np.testing.assert_allclose(out.mu, ref.mu, rtol=1e-5, atol=1e-6)




