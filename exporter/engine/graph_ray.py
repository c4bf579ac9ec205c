"""Run a stage graph on a Ray cluster: one Ray task per heavy stage, artifacts passed as paths.

The same graph the local executors run: each heavy node becomes a task that asks Ray for a core and
for the node's memory estimate (Ray places it on a node with both free), and runs the node in a
worker process through `remote_stage` (a picklable function that rebuilds the graph on the worker and
runs one node of it). What travels through Ray is small: the records stages return (paths, keys,
hashes); models and GGUFs stay on storage every node sees, where the stage cache and its locks live.
Light nodes (reading a tokenizer, writing Modelfiles and reports) run here, in the driver.

A task gets no retries: a stage that fails, or a worker that dies under it, fails its branch (the
`Scheduler` skips what needs it) and the rest of the graph goes on. The cache entry the lost stage
was building was never published, so a re-run builds just what is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from exporter.core.errors import InputError, StageError
from exporter.engine.graph import Event, Node, Outcome, Results, Scheduler, StageGraph

RemoteStage = Callable[[str, Results], tuple[Any, Any]]  # (node name, inputs) -> (result, what to absorb)
WAIT_SECONDS = 1.0


def _run_stage(remote_stage: RemoteStage, name: str, inputs: Results) -> tuple[Any, Any]:
    return remote_stage(name, inputs)


class RayExecutor:
    """Submit a graph's heavy nodes as Ray tasks to the cluster at `address` ("auto": the one started on
    this machine with `ray start`); `absorb(name, delta)` takes what a remote stage reports back."""

    def __init__(
        self,
        address: str,
        remote_stage: RemoteStage,
        absorb: Callable[[str, Any], None],
        env: dict[str, str],
        on_event: Callable[[Event], None] | None = None,
    ):
        self.address, self.remote_stage, self.absorb = address, remote_stage, absorb
        self.env, self.on_event = env, on_event
        self.log: list[Event] = []

    def connect(self) -> Any:
        import ray

        try:
            ray.init(
                address=self.address,
                runtime_env={"env_vars": self.env},
                log_to_driver=False,
                logging_level=logging.WARNING,
                configure_logging=False,
            )
        except ConnectionError as exc:
            raise InputError(
                f"Could not connect to the Ray cluster at {self.address}: {exc}. Start one (`ray start --head`) "
                "or pass --ray-address HOST:PORT of its head node."
            ) from exc
        return ray

    def run(self, graph: StageGraph) -> Outcome:
        ray = self.connect()
        try:
            self._check_fits(ray, graph)
            return self._run(ray, graph)
        finally:
            ray.shutdown()

    def _check_fits(self, ray: Any, graph: StageGraph) -> None:
        """A task that asks for more memory than any node has would wait for ever: refuse it now."""
        largest = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n["Alive"]), default=0)
        for node in graph.nodes.values():
            if node.heavy and node.memory > largest:
                raise InputError(
                    f"Stage {node.name} needs about {node.memory / 2**30:.1f} GiB and the largest node of the Ray "
                    f"cluster at {self.address} offers {largest / 2**30:.1f} GiB. Add a node with more memory."
                )

    def _run(self, ray: Any, graph: StageGraph) -> Outcome:
        task = ray.remote(_run_stage)
        scheduler = Scheduler(graph, None, self.on_event)
        self.log = scheduler.log
        pending: dict[Any, Node] = {}
        try:
            while not scheduler.done:
                started = scheduler.start_ready()
                for node, inputs in started:
                    if not node.heavy:
                        self._run_here(scheduler, node, inputs)
                        continue
                    options = {"num_cpus": node.cpus, "max_retries": 0, "name": node.name}
                    if node.memory:
                        options["memory"] = node.memory
                    pending[task.options(**options).remote(self.remote_stage, node.name, inputs)] = node
                if not pending:
                    if started:  # light stages ran here; what they unblock starts on the next turn
                        continue
                    raise RuntimeError(f"stages {sorted(scheduler.waiting)} can never start")
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_SECONDS)
                for ref in ready:
                    node = pending.pop(ref)
                    try:
                        result, delta = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - the stage's error, or a lost worker
                        scheduler.finish(node.name, error=_cause(exc, node.name))
                        continue
                    self.absorb(node.name, delta)
                    scheduler.finish(node.name, result)
        except BaseException:  # Ctrl-C: stop the tasks; their unpublished cache entries are left to clean up
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        return scheduler.outcome

    @staticmethod
    def _run_here(scheduler: Scheduler, node: Node, inputs: Results) -> None:
        try:
            result = node.run(inputs)
        except Exception as exc:  # noqa: BLE001 - fails this branch only
            scheduler.finish(node.name, error=exc)
            return
        scheduler.finish(node.name, result)


def _cause(exc: BaseException, name: str) -> BaseException:
    """The stage's own error out of Ray's wrapper; a lost worker as a StageError naming the stage."""
    from ray.exceptions import RayTaskError, TaskCancelledError, WorkerCrashedError

    if isinstance(exc, RayTaskError):
        cause = exc.cause if isinstance(exc.cause, BaseException) else None
        return cause or StageError(f"Stage {name} failed on the Ray cluster: {exc}")
    if isinstance(exc, WorkerCrashedError | TaskCancelledError):
        return StageError(
            f"The Ray worker running stage {name} was lost ({type(exc).__name__}); nothing it was building was "
            "published to the stage cache. Run the batch again to build what is missing."
        )
    return StageError(f"Stage {name} failed on the Ray cluster: {type(exc).__name__}: {exc}")
