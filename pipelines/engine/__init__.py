"""The engine: plans tasks from a stage table handed to it, fingerprints them, runs them on a Dask cluster and
records their state; the run directory's paths and lock. It imports no stage module."""
