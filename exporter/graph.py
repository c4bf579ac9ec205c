"""A command's stages as a graph (which stage needs which), and the executor that runs it.

A command builds a `StageGraph`: each node has a name (the stage's name in timings, fault points and
the cache listing), the nodes it needs, and a function that takes the results of those nodes and
returns the stage's typed record. Nodes are `heavy` (a child process or a model in memory: merge,
convert, quantize, reference, scoring) or light (reading a tokenizer, writing a text file), and a
heavy node may be `shared`: quantizations, which --jobs lets run side by side.

`LocalExecutor` runs a graph in this process: light nodes as soon as their inputs are ready, shared
heavy nodes at most `jobs` at a time, any other heavy node alone, so two heavy stages never compete
for memory unless asked to.
Every node starts only when what it needs has finished; a failure stops new nodes from starting,
waits for those running, and is raised.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

Results = Mapping[str, Any]


@dataclass(frozen=True)
class Node:
    name: str
    run: Callable[[Results], Any]
    needs: tuple[str, ...] = ()
    heavy: bool = True
    shared: bool = False  # a heavy node that may run beside others of its kind (--jobs)


@dataclass
class StageGraph:
    nodes: dict[str, Node] = field(default_factory=dict)

    def add(
        self,
        name: str,
        run: Callable[[Results], Any],
        needs: tuple[str, ...] = (),
        heavy: bool = True,
        shared: bool = False,
    ) -> str:
        """Add a node; what it needs must be in the graph already (so a graph is acyclic by construction)."""
        if name in self.nodes:
            raise ValueError(f"the stage graph already has a node {name!r}")
        missing = [need for need in needs if need not in self.nodes]
        if missing:
            raise ValueError(f"stage {name!r} needs {missing}, which are not in the graph")
        self.nodes[name] = Node(name, run, tuple(needs), heavy, shared)
        return name

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
            inputs = {need: results[need] for need in node.needs}
            running[pool.submit(node.run, inputs)] = node
