"""Feeding the EMR engine actors with Ray tasks and actors: engines start with the run, fragments flow bounded.

::

    specs ──► pack_fragments   Ray tasks (1 CPU each), at most ``ahead`` fragments packed or scoring
          ──► ScoreActor.score engine actors created when the feed starts, so their engines load while
                               the first fragments pack; ``limit`` calls in flight per actor,
                               ``threads`` of them running at once (the device under the actor's lock)
          ──► write_fragments  Ray tasks beside the actor (``ray.fragment_writers``: tasks, the default;
                               ``actor``: the actor writes the fragment itself)
          ──► driver           one marker table per fragment, in completion order

A fragment's packed batches go from its pack task to the actor by object
reference (the driver hands the reference over without waiting for it), and
the actor's marker row is all that comes back. Ray restarts a dead actor up to
:data:`ACTOR_RESTARTS` times and retries the calls it had in flight on it; the
fragment files are written atomically and the driver marks each fragment once,
so a retried call neither loses nor duplicates rows.

Why not Ray Data here: the EMR run has one CPU stage and one actor stage, and
what Ray Data added to them was start-up (its first pipeline's actor reached
``__init__`` 3.5–4.3 s in on the 2-core machine, a plain actor 0.5–0.6 s). On
one H200 at 4 M rows this feed ran 251 k and 264 k records/s against the Ray
Data pipeline's 220 k and 216 k, interleaved (docs/benchmarks.md, "Engine
actors without Ray Data"). CT keeps Ray Data: its read, resample and stitch
stages are where Ray Data's streaming pays.
"""
from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from conf.settings import Settings
from engines.source import EngineSource
from inference.actors import engine_actor_pool
from inference.emr_actors import ScoreActor, pack_fragments, write_fragments
from inference.fragments import FragmentSink, FragmentSpec, spec_dicts

# Engine actors per GPU unless ray.actors_per_gpu says. Three: while one is between batches (in a
# one-actor run on an H200 a call took 45-50 ms longer than its fragment's batches on the device,
# time in which the GPU idled), the others' batches run. On one H200 at 4 M rows, one call each and
# writer tasks, records/s: one actor 241 k, 241 k, 255 k; two 271-310 k (five runs, mean 284 k);
# three 309 k and 297 k, the only setting at efficiency >= 0.7 each time (0.72, 0.71;
# docs/benchmarks.md, "Engine actors per GPU").
EMR_ACTORS_PER_GPU = 3
# Calls an engine actor runs at once unless ray.actor_threads says. One: its process then does nothing
# but decode batches and run the engine while writer tasks write (ray.fragment_writers: tasks). On an
# H200 a second and third call in the same process slowed the device section (the calls' Python work
# takes the GIL from the thread feeding the device: 309-348 k records/s on the device against 388-404 k
# with one call), and one call with writer tasks ran ahead end to end in the same call (272 k and 258 k
# against 253 k and 238 k; docs/benchmarks.md, "Engine actors without Ray Data"). On CPUs further calls
# would compete with the engine for the same cores.
EMR_ACTOR_THREADS = 1
# CPUs a pack task asks for (it reads, validates and pads one fragment) and a writer task
# (ray.fragment_writers: tasks; it compresses and writes one fragment, mostly in Arrow's C++ code).
PACK_NUM_CPUS = 1.0
WRITER_NUM_CPUS = 0.5
# Fragments packed or scoring at once, at most, per device (a GPU, or an actor where there are
# none), unless its actors' queues hold more: a packed fragment of 65 536 rows is about 60 MB in
# the object store, an H200 scores one in ~0.16 s and a packer takes 0.1-0.6 s for it (padding
# ~0.11 s on the H200's host, read and pad 0.56 s on the 2-core machine), so 16 keeps the device
# fed without a large cluster's every CPU packing fragments far ahead of it. Per device, not per
# actor: three actors sharing a GPU score no faster than the GPU does.
PACKED_AHEAD_PER_DEVICE = 16
# Times Ray restarts a dead engine actor before the run fails (the run is then resumable: rerun with the
# same run_id). The calls it had in flight are retried for as long as it is restartable: while a lost
# node is not yet declared dead its actor is only unavailable, and each failed connection would count
# against a finite retry budget (seen with 3: the run failed on ActorUnavailableError before Ray had
# restarted the actor on the other node). Ray Data's actor pools retry the same way.
ACTOR_RESTARTS = 3
CALL_RETRIES_WHILE_RESTARTABLE = -1


def fragments_ahead(cpus: int, actors: int, devices: int, limit: int) -> int:
    """Fragments packed or scoring at once: one per CPU of the cluster, at least as many as the
    actors' queues hold (``actors × limit``), at most :data:`PACKED_AHEAD_PER_DEVICE` per device
    or those queues, whichever is more."""
    queues = actors * limit
    return min(max(cpus, queues), max(queues, devices * PACKED_AHEAD_PER_DEVICE))


class EngineActorLost(RuntimeError):
    """An engine actor died more often than Ray restarts it; the fragments marked so far are kept."""


def actor_threads(settings: Settings) -> int:
    """Calls one EMR engine actor runs at once: ``ray.actor_threads``, else :data:`EMR_ACTOR_THREADS`."""
    return settings.ray.actor_threads or EMR_ACTOR_THREADS


@dataclass
class Feed:
    """A started feed: its engine actors, the calls each runs at once, and how many fragments are
    in flight. Iterate :meth:`markers` to drive it."""

    specs: list[dict[str, Any]]
    actors: list[Any]
    threads: int
    limit: int
    ahead: int
    pack_kwargs: dict[str, Any]
    sink_ref: Any  # the FragmentSink in the object store, for writer tasks; None where the actor writes

    def markers(self) -> Iterator[pa.Table]:
        """Each scored fragment's :data:`inference.emr_actors.MARKER_SCHEMA` table, as it completes."""
        import ray

        pack = ray.remote(pack_fragments).options(num_cpus=PACK_NUM_CPUS)
        write = ray.remote(write_fragments).options(num_cpus=WRITER_NUM_CPUS)
        todo = collections.deque(self.specs)
        packed: collections.deque[Any] = collections.deque()  # pack results not yet handed to an actor
        calls: dict[Any, int] = {}  # the call's last reference (the actor's, or its writer task's) → actor
        in_flight = [0] * len(self.actors)
        while todo or packed or calls:
            while todo and len(packed) + len(calls) < self.ahead:
                packed.append(pack.remote(todo.popleft(), **self.pack_kwargs))
            while packed and min(in_flight) < self.limit:
                i = in_flight.index(min(in_flight))
                ref = self.actors[i].score.remote(packed.popleft())
                if self.sink_ref is not None:
                    ref = write.remote(ref, self.sink_ref)
                calls[ref] = i
                in_flight[i] += 1
            ready, _ = ray.wait(list(calls), num_returns=1)
            for ref in ready:
                in_flight[calls.pop(ref)] -= 1
                try:
                    yield ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    raise EngineActorLost(
                        f"an engine actor died and was restarted {ACTOR_RESTARTS} times before this fragment "
                        "finished; fragments already marked are kept: rerun with the same run_id to resume"
                    ) from exc


@contextlib.contextmanager
def started(specs: Sequence[FragmentSpec], settings: Settings, source: EngineSource, precision: str,
            sink: FragmentSink, actor_cls: type = ScoreActor, vocab_size: int | None = None) -> Iterator[Feed]:
    """Create the engine actors (they load their engines at once) and yield the :class:`Feed` that
    packs ``specs`` and scores them; the actors are killed on exit, so the GPUs are free for what
    follows (the FP32 safe mode's second attempt)."""
    import ray

    cluster = ray.cluster_resources()
    gpus = int(cluster.get("GPU", 0))
    size, resources = engine_actor_pool(settings, gpus, EMR_ACTORS_PER_GPU)
    threads = actor_threads(settings)
    in_actor = settings.ray.fragment_writers == "actor"
    engine_actor = ray.remote(actor_cls).options(max_concurrency=threads, max_restarts=ACTOR_RESTARTS,
                                                 max_task_retries=CALL_RETRIES_WHILE_RESTARTABLE,
                                                 **resources)
    actors = [engine_actor.remote(source, precision, sink if in_actor else None, threads) for _ in range(size)]
    # Several calls per actor in flight: its next fragments arrive while the engine runs, and with
    # ray.actor_threads > 1 that many run at once (ScoreActor takes its device lock only around infer).
    limit = max(4, 2 * threads)
    try:
        yield Feed(specs=spec_dicts(list(specs)), actors=actors, threads=threads, limit=limit,
                   ahead=fragments_ahead(int(cluster.get("CPU", 1)), size,
                                         min(gpus, size) if gpus else size, limit),
                   pack_kwargs={"length_buckets": list(settings.scoring.length_buckets),
                                "token_budget": settings.scoring.token_budget, "vocab_size": vocab_size},
                   sink_ref=None if in_actor else ray.put(sink))
    finally:
        for actor in actors:
            ray.kill(actor)
