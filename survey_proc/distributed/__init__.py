"""Dask plumbing: cluster creation/attachment, per-worker model plugins, the task graph."""
