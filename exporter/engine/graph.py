"""A command's stages as a graph (which stage needs which), and the executor that runs it.

A command builds a `StageGraph`: each node has a name (the stage's name in timings, fault points and
the cache listing), the nodes it needs, and a function that takes the results of those nodes and
returns the stage's typed record. Adding a node returns its handle, a `Stage[T]` (T: the record), and
a node reads what it needs by handle: `results[stage]` is a T. Nodes are `heavy` (a child process or a
model in memory: merge, convert, quantize, reference, scoring) or light (reading a tokenizer, writing a
text file), and a heavy node may be `shared`: quantizations, which --jobs lets run side by side.

`LocalExecutor` runs a graph in this process: light nodes as soon as their inputs are ready, shared
heavy nodes at most `jobs` at a time, any other heavy node alone, so two heavy stages never compete
for memory unless asked to.
Every node starts only when what it needs has finished; a failure stops new nodes from starting,
waits for those running, and is raised.

A batch of exports is one large graph, run by `BudgetedExecutor` on this machine (or by
exporter.engine.graph_ray's executor on a Ray cluster): every heavy node carries an estimate of its peak
memory, and a node starts only when a core is free and its estimate fits beside those of the nodes
running (the `Scheduler`, whose log records every start, end, and node held back for memory). A
failed node fails the nodes that need it, not the others: the run keeps going and its `Outcome`
says which failed and which were skipped because of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


@dataclass(frozen=True)
class Stage(Generic[T_co]):
    """A node as the nodes that need it see it: `StageGraph.add` returns it, and a node that needs it
    reads its result, a T, as `results[stage]`."""

    name: str


class Results:
    """The results a node receives (those of the nodes it needs), read by handle: `results[stage]`.

    The executors and the engine also read them by node name."""

    def __init__(self, values: Mapping[str, Any]):
        self._values = dict(values)

    @overload
    def __getitem__(self, stage: Stage[T]) -> T: ...
    @overload
    def __getitem__(self, stage: str) -> Any: ...
    def __getitem__(self, stage: Stage[Any] | str) -> Any:
        return self._values[stage if isinstance(stage, str) else stage.name]

    def optional(self, stage: Stage[T] | None) -> T | None:
        """The result of a node the graph may not have (None: it has not)."""
        return None if stage is None else self[stage]

    def get(self, stage: Stage[Any] | str, default: Any = None) -> Any:
        """The result of a node, or `default` where the node is not among these results."""
        return self._values.get(stage if isinstance(stage, str) else stage.name, default)

    def __contains__(self, stage: object) -> bool:
        return (stage.name if isinstance(stage, Stage) else stage) in self._values

    def items(self) -> list[tuple[str, Any]]:
        """(node name, result) pairs: how an including graph renames what its sub-graph's nodes receive."""
        return list(self._values.items())


@dataclass(frozen=True)
class Node:
    name: str
    run: Callable[[Results], Any]
    needs: tuple[str, ...] = ()
    heavy: bool = True
    shared: bool = False  # a heavy node that may run beside others of its kind (--jobs)
    memory: int = 0  # estimated peak resident bytes, for the budgeted executors
    cpus: int = 1


@dataclass
class StageGraph:
    nodes: dict[str, Node] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()  # a sub-graph's: what its nodes need from the graph that includes it

    def add(
        self,
        name: str,
        run: Callable[[Results], T],
        needs: Sequence[Stage[Any] | str] = (),
        heavy: bool = True,
        shared: bool = False,
        memory: int = 0,
    ) -> Stage[T]:
        """Add a node and return its handle; what it needs must be in the graph already, or be one of its
        `inputs` (so a graph is acyclic by construction)."""
        if name in self.nodes:
            raise ValueError(f"the stage graph already has a node {name!r}")
        names = tuple(need if isinstance(need, str) else need.name for need in needs)
        missing = [need for need in names if need not in self.nodes and need not in self.inputs]
        if missing:
            raise ValueError(f"stage {name!r} needs {missing}, which are not in the graph")
        self.nodes[name] = Node(name, run, names, heavy, shared, memory if heavy else 0)
        return Stage(name)

    def include(
        self,
        prefix: str,
        graph: StageGraph,
        memory: Callable[[str], int] | None = None,
        sep: str = "/",
        inputs: Mapping[str, str] | None = None,
    ) -> None:
        """Add every node of `graph` as `<prefix><sep><name>` (a batch's graph is made of its exports' graphs,
        a QLoRA export's of its merge candidates'; an empty prefix keeps the names), and give it each of
        `graph.inputs` from the node of this graph that `inputs` maps it to. Each node still receives its
        inputs under the names its own graph gave them; `memory(name)` estimates its peak (None: the
        estimate it has)."""
        given = dict(inputs or {})
        unmapped = [name for name in graph.inputs if name not in given]
        if unmapped:
            raise ValueError(f"the included graph {prefix!r} needs {unmapped}, which no node gives it")
        outer = {name: f"{prefix}{sep}{name}" if prefix else name for name in graph.nodes}
        outer.update((name, given[name]) for name in graph.inputs)
        for node in graph.nodes.values():
            needs = tuple(outer[need] for need in node.needs)
            self.add(
                outer[node.name],
                _renamed(node.run, {outer[need]: need for need in node.needs}),
                needs,
                node.heavy,
                node.shared,
                node.memory if memory is None else memory(node.name),
            )

    @property
    def order(self) -> list[str]:
        """The nodes in the order they were added: an order in which each comes after what it needs."""
        return list(self.nodes)


class LocalExecutor:
    """Runs a graph in threads of this process (stages that do real work start child processes)."""

    def __init__(self, jobs: int = 1):
        self.jobs = max(1, jobs)
        self.log: list[tuple[str, str]] = []  # ("start" | "end", node): what ran when, in order

    def run(self, graph: StageGraph) -> dict[str, Any]:
        results: dict[str, Any] = {}
        waiting = dict(graph.nodes)
        running: dict[Future[Any], Node] = {}
        workers = self.jobs + sum(1 for node in graph.nodes.values() if not node.heavy)
        pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="stage")
        failure: BaseException | None = None
        try:
            while waiting or running:
                if failure is None:
                    self._start_ready(waiting, running, results, pool)
                if not running:
                    if waiting and failure is None:
                        raise RuntimeError(f"stages {sorted(waiting)} can never start")
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    node = running.pop(future)
                    self.log.append(("end", node.name))
                    error = future.exception()
                    if error is not None:
                        failure = failure or error
                    else:
                        results[node.name] = future.result()
                if failure is not None:
                    waiting.clear()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        if failure is not None:
            raise failure
        return results

    def _start_ready(
        self,
        waiting: dict[str, Node],
        running: dict[Future[Any], Node],
        results: dict[str, Any],
        pool: ThreadPoolExecutor,
    ) -> None:
        heavy = [node for node in running.values() if node.heavy]
        for name, node in list(waiting.items()):
            if not all(need in results for need in node.needs):
                continue
            if node.heavy and heavy:
                alone = not node.shared or any(not other.shared for other in heavy)
                if alone or len(heavy) >= self.jobs:
                    continue
            del waiting[name]
            if node.heavy:
                heavy.append(node)
            self.log.append(("start", name))
            inputs = Results({need: results[need] for need in node.needs})
            running[pool.submit(node.run, inputs)] = node


def _renamed(run: Callable[[Results], Any], names: dict[str, str]) -> Callable[[Results], Any]:
    def call(results: Results) -> Any:
        return run(Results({names.get(name, name): value for name, value in results.items()}))

    return call


@dataclass(frozen=True)
class Budget:
    """What a budgeted executor may use at once: heavy stages (one core each) and their memory estimates."""

    cpus: int
    memory: int  # bytes


@dataclass
class Outcome:
    """What a run that keeps going past failures finished, what failed (with the error) and what it skipped."""

    results: dict[str, Any] = field(default_factory=dict)
    failed: dict[str, BaseException] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # node -> the failed node it needed


Event = dict[str, Any]


class Scheduler:
    """Decides which nodes start, within a budget (None: every ready node at once, a cluster's own
    scheduler places them), and keeps going past a failure: the nodes that need a failed one are skipped.

    Every decision is an event in `log` (and passed to `on_event`): start, end, failed, skipped, and
    held (a ready node kept waiting because its memory estimate does not fit beside the running ones)."""

    def __init__(
        self, graph: StageGraph, budget: Budget | None, on_event: Callable[[Event], None] | None = None
    ):
        self.graph, self.budget, self.on_event = graph, budget, on_event
        self.waiting = dict(graph.nodes)
        self.running: dict[str, Node] = {}
        self.outcome = Outcome()
        self.log: list[Event] = []
        self._held: set[str] = set()
        self._start = time.monotonic()
        if budget is not None:
            for node in graph.nodes.values():
                if node.memory > budget.memory:
                    raise ValueError(
                        f"stage {node.name!r} needs about {node.memory} bytes, more than the budget {budget.memory}"
                    )

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def _usage(self) -> tuple[int, int]:
        heavy = [n for n in self.running.values() if n.heavy]
        return sum(n.cpus for n in heavy), sum(n.memory for n in heavy)

    def _event(self, event: str, node: Node, **more: Any) -> None:
        cpus, memory = self._usage()
        record = {
            "t": round(time.monotonic() - self._start, 3),
            "event": event,
            "stage": node.name,
            "memory": node.memory,
            "memory_in_use": memory,
            "cpus_in_use": cpus,
            **({"memory_budget": self.budget.memory, "cpus": self.budget.cpus} if self.budget else {}),
            **more,
        }
        self.log.append(record)
        if self.on_event is not None:
            self.on_event(record)

    def _fits(self, node: Node) -> bool:
        if self.budget is None or not node.heavy:
            return True
        cpus, memory = self._usage()
        if cpus + node.cpus > self.budget.cpus:
            return False
        if memory + node.memory > self.budget.memory:
            if node.name not in self._held:
                self._held.add(node.name)
                self._event("held", node, reason="memory")
            return False
        return True

    def start_ready(self) -> list[tuple[Node, Results]]:
        """The nodes to start now, each with its inputs; they count as running from here."""
        results = self.outcome.results
        started = []
        for name, node in list(self.waiting.items()):
            if not all(need in results for need in node.needs) or not self._fits(node):
                continue
            del self.waiting[name]
            self.running[name] = node
            self._event("start", node)
            started.append((node, Results({need: results[need] for need in node.needs})))
        return started

    def finish(self, name: str, result: Any = None, error: BaseException | None = None) -> None:
        """Record a node's result, or its failure and the nodes that can now never run."""
        node = self.running.pop(name)
        if error is None:
            self.outcome.results[name] = result
            self._event("end", node)
            return
        self.outcome.failed[name] = error
        self._event("failed", node, error=f"{type(error).__name__}: {error}"[:500])
        lost = {name}
        for other, waiting in list(self.waiting.items()):  # graph order: what a node needs comes first
            cause = next((need for need in waiting.needs if need in lost), None)
            if cause is not None:
                lost.add(other)
                del self.waiting[other]
                self.outcome.skipped[other] = self.outcome.skipped.get(cause, cause)
                self._event("skipped", waiting, cause=self.outcome.skipped[other])


class BudgetedExecutor:
    """Runs a graph on this machine within a `Budget`, keeping going past failures (see `Scheduler`)."""

    def __init__(self, budget: Budget, on_event: Callable[[Event], None] | None = None):
        self.budget, self.on_event = budget, on_event
        self.log: list[Event] = []

    def run(self, graph: StageGraph) -> Outcome:
        scheduler = Scheduler(graph, self.budget, self.on_event)
        self.log = scheduler.log
        light = sum(1 for node in graph.nodes.values() if not node.heavy)
        pool = ThreadPoolExecutor(max_workers=max(1, self.budget.cpus + light), thread_name_prefix="stage")
        running: dict[Future[Any], Node] = {}
        try:
            while not scheduler.done:
                for node, inputs in scheduler.start_ready():
                    running[pool.submit(node.run, inputs)] = node
                if not running:
                    raise RuntimeError(f"stages {sorted(scheduler.waiting)} can never start")
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    node = running.pop(future)
                    error = future.exception()
                    scheduler.finish(node.name, None if error else future.result(), error)
        except BaseException:  # Ctrl-C: start nothing more, let the running stages end (or die with it)
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return scheduler.outcome
