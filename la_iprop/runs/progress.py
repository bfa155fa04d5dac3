"""Progress of a run: one tqdm bar over every (variant, image), or one log line per batch."""

from __future__ import annotations

import contextlib
import logging
import math
import pathlib
import threading
import time

import numpy as np

from la_iprop.runs.store import load_records

__all__ = ["RunningMean", "RunProgress"]

log = logging.getLogger("la_iprop")


class RunningMean:
    """Running mean of per-image AUCs under the first protocol, seeded with the batches finished earlier."""

    def __init__(self, out: pathlib.Path, variant: str, protocol: str):
        previous = load_records(out, variant, protocol)
        self.ins = list(previous["insertion"]) if previous else []
        self.dele = list(previous["deletion"]) if previous else []

    def add(self, ins, dele):
        self.ins += list(ins)
        self.dele += list(dele)

    @property
    def insertion(self) -> float:
        return float(np.mean(self.ins)) if self.ins else float("nan")

    @property
    def deletion(self) -> float:
        return float(np.mean(self.dele)) if self.dele else float("nan")


def _progress(*, total: int, initial: int, desc: str, enabled: bool):
    """The tqdm bar of a run (see :class:`RunProgress`): fractional counts of maps, an image under a
    variant (a batch advances per stage and per scored chunk); ETA from the mean rate since the start
    (``smoothing=0``), exact at batch ends."""
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="img", disable=not enabled, smoothing=0,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total_fmt} img "
                           "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class RunProgress:
    """Progress of a run: a tqdm bar (``progress=True``) or one INFO line per (variant, batch).

    The bar counts maps (an image under a variant; with one variant, images). Within a batch each
    stage (the maps, then each protocol's insertion/deletion games) owns a share of the batch's
    images, proportional to the seconds per image the stage took in the variant's previous batch
    (equal shares in its first batch, or when the stages differ). The maps are one call per batch:
    their share is added when it returns, while the bar's clock ticks and its postfix names the
    variant and stage; the games advance it per scored chunk (the ``progress`` callback of
    :func:`la_iprop.metrics.evaluate`). At each batch end the count is exact again. Without the bar
    (``--progress=false``) each batch logs its stage seconds, images/s and the run's ETA.
    """

    def __init__(self, *, total: int, done: int, batches: int, desc: str, enabled: bool):
        self.batches, self.enabled = batches, enabled
        self.bar = _progress(total=total, initial=done, desc=desc, enabled=enabled)
        self.total, self.done, self.position = total, done, float(done)   # maps: exact / fractional
        self.started = time.perf_counter()
        self.session_maps = 0
        self.per_image: dict[str, dict[str, float]] = {}   # variant -> seconds per image of each stage
        self.lock = threading.Lock()
        self.variant, self.running, self.number, self.n = "", None, 0, 0
        self.shares: dict[str, float] = {}
        self.stage_done: dict[str, float] = {}
        self.timings: dict[str, float] = {}
        self.current: str | None = None

    # ------------------------------------------------------------------ batches and stages
    def start_batch(self, variant: str, number: int, n: int, running: "RunningMean") -> None:
        self.variant, self.running, self.number, self.n = variant, running, number, n
        self.timings, self.current, self.shares, self.stage_done = {}, None, {}, {}
        self.batch_started = time.perf_counter()
        self._postfix("loading")

    def set_stages(self, stages) -> None:
        stages = list(stages)
        previous = self.per_image.get(self.variant, {})
        seconds = [previous.get(s) for s in stages]
        if stages and None not in seconds and sum(seconds) > 0:
            self.shares = {s: t / sum(seconds) for s, t in zip(stages, seconds, strict=True)}
        else:
            self.shares = {s: 1.0 / len(stages) for s in stages} if stages else {}
        self.stage_done = {s: 0.0 for s in stages}

    @contextlib.contextmanager
    def stage(self, name: str):
        if name not in self.shares:  # not planned: no share of the bar, its seconds are still logged
            self.shares[name], self.stage_done[name] = 0.0, 0.0
        self.current = name
        self._postfix("attribution" if name == "attribution" else f"metrics {name}")
        started = time.perf_counter()
        stop = threading.Event()
        ticker = threading.Thread(target=self._tick, args=(stop,), daemon=True) if self.enabled else None
        if ticker is not None:
            ticker.start()
        try:
            yield
        finally:
            stop.set()
            if ticker is not None:
                ticker.join()
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - started
            self._advance(name, 1.0)   # the stage is done: all of its share
            self.current = None

    def chunk(self, count: int, total: int) -> None:
        """``evaluate``'s progress callback (host thread): ``count`` of ``total`` perturbed images scored."""
        current = self.current
        if current is not None and total > 0:
            self._advance(current, self.stage_done.get(current, 0.0) + count / total)

    def end_batch(self) -> None:
        now = time.perf_counter()
        seconds = now - self.batch_started
        with self.lock:
            self.done += self.n
            self.bar.update(self.done - self.position)   # exact again (no fractional drift)
            self.position = float(self.done)
        self.session_maps += self.n
        self.per_image[self.variant] = {s: t / self.n for s, t in self.timings.items()}
        self._postfix(None)
        if not self.enabled:
            rate = self.session_maps / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            stages = ", ".join(f"{'attribution' if s == 'attribution' else 'metrics ' + s} {t:.1f} s"
                               for s, t in self.timings.items())
            log.info("%s: batch %d/%d, %d image%s (%d/%d maps done): %s; %.1f s (%.3g images/s); ETA %s for the "
                     "run (%s: ins %.4f, del %.4f)", self.variant, self.number + 1, self.batches, self.n,
                     "" if self.n == 1 else "s", self.done, self.total, stages or "nothing to compute", seconds,
                     self.n / max(seconds, 1e-9), _duration(eta), self.variant, self.running.insertion,
                     self.running.deletion)

    def close(self) -> None:
        self.bar.close()

    # ------------------------------------------------------------------ display
    def _advance(self, stage: str, fraction: float) -> None:
        with self.lock:
            fraction = min(max(fraction, self.stage_done.get(stage, 0.0)), 1.0)
            step = (fraction - self.stage_done.get(stage, 0.0)) * self.shares.get(stage, 0.0) * self.n
            self.stage_done[stage] = fraction
            if step > 0:
                step = min(step, self.done + self.n - self.position)
                self.position += step
                self.bar.update(step)

    def _postfix(self, stage: str | None) -> None:
        if not self.enabled or self.running is None:
            return
        scores = f"ins={self.running.insertion:.4f}, dele={self.running.deletion:.4f}" if self.running.ins else ""
        where = f"{self.variant} · batch {self.number + 1}/{self.batches} · {stage}" if stage else self.variant
        with self.lock:
            self.bar.set_postfix_str(", ".join(part for part in (where, scores) if part))

    def _tick(self, stop: threading.Event) -> None:
        while not stop.wait(1.0):   # keeps the clock moving while a stage's single call runs
            self.bar.refresh()
