"""The stage graph and the local executor: order, how many heavy stages at once, failures."""

from __future__ import annotations

import threading

import pytest

from exporter.engine.graph import Budget, BudgetedExecutor, LocalExecutor, StageGraph


def overlapping(log: list[tuple[str, str]], heavy: set[str]) -> int:
    """The most heavy nodes the executor had started and not yet seen end, at any point of its log."""
    running: set[str] = set()
    most = 0
    for event, name in log:
        if name not in heavy:
            continue
        if event == "start":
            running.add(name)
            most = max(most, len(running))
        else:
            running.discard(name)
    return most


def test_each_stage_gets_what_it_needs_and_runs_after_it():
    graph = StageGraph()
    graph.add("merge", lambda _: 1)
    graph.add("convert", lambda r: r["merge"] + 1, ("merge",))
    graph.add("chat", lambda r: r["merge"] * 10, ("merge",), heavy=False)
    graph.add("report", lambda r: (r["convert"], r["chat"]), ("convert", "chat"), heavy=False)
    executor = LocalExecutor()
    results = executor.run(graph)
    assert results == {"merge": 1, "convert": 2, "chat": 10, "report": (2, 10)}
    order = [name for event, name in executor.log if event == "start"]
    assert order.index("merge") < order.index("convert") < order.index("report")


def test_heavy_stages_run_alone_and_shared_ones_jobs_at_a_time():
    graph = StageGraph()
    graph.add("convert", lambda _: None)
    shared = {f"quantize:{p}" for p in ("Q2_K", "Q4_K_M", "Q8_0", "Q6_K")}
    for name in sorted(shared):
        graph.add(name, lambda _: None, ("convert",), shared=True)
    graph.add("reference", lambda _: None, ("convert",))
    graph.add("side", lambda _: None, ("convert",), heavy=False)
    for jobs in (1, 2, 3):
        executor = LocalExecutor(jobs)
        executor.run(graph)
        assert overlapping(executor.log, shared | {"convert", "reference"}) <= jobs
        # the non-shared heavy stage never runs beside another heavy stage
        log = executor.log
        start, end = log.index(("start", "reference")), log.index(("end", "reference"))
        assert not any(event == "start" and name in shared for event, name in log[start:end])


def test_a_failure_stops_new_stages_and_is_raised():
    started: list[str] = []

    def fail(_: object) -> None:
        raise ValueError("convert failed")

    graph = StageGraph()
    graph.add("merge", lambda _: started.append("merge"))
    graph.add("convert", fail, ("merge",))
    graph.add("quantize", lambda _: started.append("quantize"), ("convert",))
    with pytest.raises(ValueError, match="convert failed"):
        LocalExecutor().run(graph)
    assert started == ["merge"]


def test_a_graph_refuses_unknown_needs_and_duplicates():
    graph = StageGraph()
    graph.add("merge", lambda _: None)
    with pytest.raises(ValueError, match="not in the graph"):
        graph.add("convert", lambda _: None, ("merged",))
    with pytest.raises(ValueError, match="already has"):
        graph.add("merge", lambda _: None)


def test_an_included_graph_takes_its_inputs_from_the_including_one_under_its_own_names():
    """A QLoRA candidate's sub-graph: its nodes become `<label>:<name>`, need the references of the graph
    that includes it, and the batch includes the lot again under the export's name."""
    candidate = StageGraph(inputs=("ref",))
    candidate.add("merge", lambda _: 1, memory=5)
    candidate.add("score", lambda r: (r["merge"], r["ref"]), ("merge", "ref"), memory=7)
    export = StageGraph()
    export.add("reference", lambda _: "R")
    export.include("w16", candidate, sep=":", inputs={"ref": "reference"})
    export.add("choose", lambda r: r["w16:score"], ("w16:score",), heavy=False)
    assert export.nodes["w16:score"].needs == ("w16:merge", "reference")
    assert export.nodes["w16:score"].memory == 7  # no estimator: the estimate the node had
    batch = StageGraph()
    batch.include("job", export, lambda name: len(name))
    assert batch.nodes["job/w16:score"].needs == ("job/w16:merge", "job/reference")
    assert batch.nodes["job/w16:merge"].memory == len("w16:merge")
    assert LocalExecutor().run(batch)["job/choose"] == (1, "R")
    with pytest.raises(ValueError, match=r"needs \['ref'\], which no node gives it"):
        StageGraph().include("w16", candidate, sep=":")
    with pytest.raises(ValueError, match="not in the graph"):
        candidate.add("convert", lambda _: None, ("reference",))


def test_the_budgeted_executor_holds_a_stage_whose_memory_does_not_fit_and_logs_why():
    gib = 1 << 30
    release = threading.Event()
    graph = StageGraph()
    graph.add("a/convert", lambda _: release.wait(10), memory=gib)
    graph.add("b/convert", lambda _: "b", memory=gib)  # does not fit beside a/convert
    graph.add("c/quantize", lambda _: release.set(), memory=gib // 2)  # fits, and lets a/convert end
    executor = BudgetedExecutor(Budget(cpus=2, memory=gib + gib // 2))
    outcome = executor.run(graph)
    assert set(outcome.results) == {"a/convert", "b/convert", "c/quantize"} and not outcome.failed
    events = [(e["event"], e["stage"]) for e in executor.log]
    assert events.index(("held", "b/convert")) < events.index(("start", "c/quantize"))
    assert events.index(("end", "a/convert")) < events.index(("start", "b/convert"))
    assert max(e["memory_in_use"] for e in executor.log) <= gib + gib // 2


def test_a_failed_stage_fails_its_branch_and_the_rest_of_the_graph_finishes():
    def broken(_: object) -> None:
        raise RuntimeError("quantizer crashed")

    graph = StageGraph()
    graph.add("a/merge", lambda _: 1)
    graph.add("a/quantize", broken, ("a/merge",))
    graph.add("a/report", lambda _: None, ("a/quantize",), heavy=False)
    graph.add("a/modelfiles", lambda _: None, ("a/report",), heavy=False)
    graph.add("b/merge", lambda _: 2)
    graph.add("b/quantize", lambda r: r["b/merge"] + 1, ("b/merge",))
    outcome = BudgetedExecutor(Budget(cpus=1, memory=1 << 30)).run(graph)
    assert outcome.results == {"a/merge": 1, "b/merge": 2, "b/quantize": 3}
    assert list(outcome.failed) == ["a/quantize"] and "crashed" in str(outcome.failed["a/quantize"])
    assert outcome.skipped == {"a/report": "a/quantize", "a/modelfiles": "a/quantize"}
