"""survey-proc: batch processing of time-domain sky surveys.

Zarr survey store -> detections and photometry on overlapping tiles (Dask) -> merged,
calibrated catalogues -> Parquet light curves -> periodic-variable classes.
See ``../shared/DESIGN.md`` for the architecture and the output contract.
"""

__version__ = "0.1.0"
