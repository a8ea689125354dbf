"""Prometheus metrics computed from the job store at scrape time (works across worker processes/restarts)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from server.store import STAGE_BUCKETS, Store


class StoreCollector(Collector):
    """Queue depth, jobs by status, worker states, GPU memory and stage-duration histograms."""

    def __init__(self, store: Store, instance: str) -> None:
        self.store = store
        self.instance = instance

    def collect(self) -> Iterator:
        counts = self.store.count_by_status()
        q = GaugeMetricFamily("vace_queue_depth", "Jobs waiting for a worker")
        q.add_metric([], counts.get("queued", 0))
        yield q
        j = GaugeMetricFamily("vace_jobs", "Jobs in the store by status", labels=["status"])
        for status, n in counts.items():
            j.add_metric([status], n)
        yield j
        ws = self.store.list_workers(self.instance)
        w = GaugeMetricFamily("vace_workers", "Worker processes by state", labels=["state"])
        states: dict[str, int] = {}
        for row in ws:
            states[row["status"]] = states.get(row["status"], 0) + 1
        for state, n in sorted(states.items()):
            w.add_metric([state], n)
        yield w
        mem = GaugeMetricFamily("vace_gpu_memory_bytes", "GPU memory reported by each worker",
                                labels=["worker", "device", "kind"])
        for row in ws:
            for kind in ("allocated", "reserved", "total"):
                v = (row.get("info") or {}).get(f"gpu_memory_{kind}")
                if v is not None:
                    mem.add_metric([str(row["slot"]), row["device"], kind], float(v))
        yield mem
        h = HistogramMetricFamily("vace_stage_duration_seconds", "Duration of job stages", labels=["stage"])
        for stage, agg in sorted(self.store.stage_histograms().items()):
            buckets = [(str(le), float(n)) for le, n in zip(STAGE_BUCKETS, agg["buckets"], strict=False)]
            buckets.append(("+Inf", float(agg["count"])))
            h.add_metric([stage], buckets, agg["total"])
        yield h


def make_registry(store: Store, instance: str) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StoreCollector(store, instance))
    return reg
