"""Where blocks run: in this process (default) or on a Dask cluster.

An executor is anything with `map(fn, items, desc=None) -> list` that preserves order; with
`progress` on, a map given a `desc` shows a progress bar of finished tasks. Task functions must be
top-level functions taking picklable arguments, so the same code runs on Dask workers.
"""

from __future__ import annotations

from typing import Callable, Iterable


class InProcess:
    """Runs tasks one after another in this process."""

    def __init__(self, progress: bool = False):
        self.progress = progress

    def map(self, fn: Callable, items: Iterable, desc: str | None = None) -> list:
        items = list(items)
        with _bar(len(items), desc, self.progress) as bar:
            return [(fn(item), bar.update(1))[0] for item in items]

    def close(self) -> None:
        pass


class DaskExecutor:
    """Runs tasks on a Dask cluster: 'local' starts a LocalCluster, else joins a scheduler address."""

    def __init__(self, address: str, workers: int = 2, progress: bool = False):
        from distributed import Client, LocalCluster

        self.cluster, self.progress = None, progress
        if address == "local":
            self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
            self.client = Client(self.cluster)
        else:
            self.client = Client(address)

    def map(self, fn: Callable, items: Iterable, desc: str | None = None) -> list:
        from distributed import as_completed

        futures = self.client.map(fn, list(items), pure=False)
        with _bar(len(futures), desc, self.progress) as bar:
            for _ in as_completed(futures):
                bar.update(1)
        return self.client.gather(futures)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def make_executor(dask: str | None, workers: int = 2, progress: bool = False):
    """InProcess() for None, else a DaskExecutor for 'local' or a scheduler address."""
    return InProcess(progress) if not dask else DaskExecutor(dask, workers, progress)


def _bar(total: int, desc: str | None, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="task", disable=not (enabled and desc))
