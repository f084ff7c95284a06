"""GPU memory: recognising an out-of-memory error, so that batches can back off.

Models run their batches through :func:`is_oom`-guarded loops: on a CUDA out-of-memory
error the batch is halved (and the allocator's cache released) and the same work is run
again, down to one item; only one item that does not fit is an error. No RMM pool is set up
(dask-cuda's ``rmm_pool_size`` is left off), so torch's caching allocator is the only one.
"""

from __future__ import annotations

import torch


def is_oom(exc: BaseException) -> bool:
    """True for a CUDA out-of-memory error (torch's class, or the RuntimeError older versions raise).

    Parameters
    ----------
    exc
        The exception raised by a batch.

    Returns
    -------
    bool
        Whether a smaller batch may succeed.
    """
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or (isinstance(exc, RuntimeError)
                                                          and "out of memory" in str(exc).lower())


def release_cache() -> None:
    """Give the CUDA allocator's cached blocks back (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
