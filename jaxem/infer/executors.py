"""Where blocks run: in this process (default) or on a Dask cluster.

An executor is anything with `map(fn, items) -> list` that preserves order. Task functions must be
top-level functions taking picklable arguments, so the same code runs on Dask workers.
"""

from __future__ import annotations

from typing import Callable, Iterable


class InProcess:
    """Runs tasks one after another in this process."""

    def map(self, fn: Callable, items: Iterable) -> list:
        return [fn(item) for item in items]

    def close(self) -> None:
        pass


class DaskExecutor:
    """Runs tasks on a Dask cluster: 'local' starts a LocalCluster, else joins a scheduler address."""

    def __init__(self, address: str, workers: int = 2):
        from distributed import Client, LocalCluster

        self.cluster = None
        if address == "local":
            self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
            self.client = Client(self.cluster)
        else:
            self.client = Client(address)

    def map(self, fn: Callable, items: Iterable) -> list:
        futures = self.client.map(fn, list(items), pure=False)
        return self.client.gather(futures)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def make_executor(dask: str | None, workers: int = 2):
    """InProcess() for None, else a DaskExecutor for 'local' or a scheduler address."""
    return InProcess() if not dask else DaskExecutor(dask, workers)
