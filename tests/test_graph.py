"""The grid as one graph (dft.graph): no import cycle, the cost of the two SLURM layouts, the plan's graph."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from conftest import ROOT, run_train

STAGES = ("cpt", "sft", "dpo", "orpo")
BASE = ["model=tiny", "data=tiny", "eval=none", "logger=none", *[f"strategy.{s}.trainer.max_steps=1" for s in STAGES]]


# ------------------------------------------------------------------------------- import graph
def _module_imports() -> dict[str, set[str]]:
    """dft module -> the dft modules it imports anywhere (module level or inside a function)."""
    mods = {}
    for p in (ROOT / "dft").rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    out = {}
    for name, p in mods.items():
        pkg = name if p.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.Import):
                deps |= {a.name for a in n.names}
            elif isinstance(n, ast.ImportFrom):
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - n.level + 1] + [n.module or ""]).strip(".") \
                    if n.level else (n.module or "")
                deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in n.names}
        out[name] = {d for d in deps if d in mods and d != name}
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_among_dft_modules():
    """Before: dft.pipeline <-> dft.plan (the plan imported the private _container) and
    dft.families -> dft.modeling -> dft.families (and via dft.tokenizers_offline)."""
    graph = _module_imports()
    assert "dft.graph" in graph["dft.plan"] and "dft.graph" in graph["dft.pipeline"]
    assert "dft.pipeline" not in graph["dft.plan"]
    assert _cycles(graph) == []


# ------------------------------------------------------------------------------- cost
def _hand_graph():
    """Three cells: A = cpt (1 h), B = cpt -> sft (0.5 h), C = cpt -> sft -> dpo (0.25 h), no evals."""
    from dft.graph import Graph, Node

    g = Graph()
    cpt = Node("stage/c", "stage", "c", "cpt", [], gpu_hours=1.0)
    sft = Node("stage/s", "stage", "s", "cpt_sft", ["stage/c"], gpu_hours=0.5)
    dpo = Node("stage/d", "stage", "d", "cpt_sft_dpo", ["stage/s"], gpu_hours=0.25)
    chains = {"A": [cpt], "B": [cpt, sft], "C": [cpt, sft, dpo]}
    for cell, nodes in chains.items():
        for n in nodes:
            g.add(cell, n)
        g.add(cell, Node(f"summary/{cell}", "summary", cell, f"summary({cell})", [n.id for n in nodes]))
    return g


def test_layout_costs_of_a_hand_made_graph():
    from dft.graph import critical_path, layout_costs, simulate_cell_array

    g = _hand_graph()
    assert g.counts() == {"eval_start": 0, "stage": 3, "merge": 0, "eval": 0, "summary": 3}
    assert g.nodes["stage/c"].cells == ["A", "B", "C"] and g.nodes["stage/s"].cells == ["B", "C"]
    hours, path = critical_path(g)
    assert hours == 1.75 and path[:3] == ["stage/c", "stage/s", "stage/d"]
    # cell array: B and C wait on A's cpt for 1 h each; at t=1 B starts sft (first in sweep order),
    # C waits 0.5 h more on its lock; C trains dpo 1.5 -> 1.75
    sim = simulate_cell_array(g)
    assert sim["wait_h"] == 2.5 and sim["wall_h"] == 1.75
    assert sim["waits"] == {"B": [("stage/c", 1.0)], "C": [("stage/c", 1.0), ("stage/s", 0.5)]}
    c = layout_costs(g, world=1, gpus=1)
    assert c["graph"] == {"useful_gpu_h": 1.75, "idle_gpu_h": 0.0, "held_gpu_h": 1.75, "wall_h": 1.75, "jobs": 6}
    assert c["cells"] == {"useful_gpu_h": 1.75, "idle_gpu_h": 2.5, "held_gpu_h": 4.25, "wall_h": 1.75, "jobs": 3}
    # 8-GPU jobs: every stage runs 8x faster, and a waiting cell holds 8 GPUs: the same GPU-hours idle
    c8 = layout_costs(g, world=8, gpus=8)
    assert c8["cells"]["idle_gpu_h"] == 2.5 and c8["graph"]["wall_h"] == 1.75 / 8
    # a cached cpt: nobody waits for it; C still waits for B's sft
    g.nodes["stage/c"].cached = True
    c = layout_costs(g)
    assert c["cells"]["idle_gpu_h"] == 0.5 and c["graph"]["useful_gpu_h"] == 0.75 and c["graph"]["wall_h"] == 0.75


def test_graph_descendants_and_json_round_trip(tmp_path):
    from dft.graph import Graph

    g = _hand_graph()
    assert g.descendants("stage/s") == ["summary/B", "stage/d", "summary/C"]
    g.write(tmp_path / "g.json")
    h = Graph.read(tmp_path / "g.json")
    assert h.to_json() == g.to_json() and h.topological() == g.topological()


# ------------------------------------------------------------------------------- the plan's graph
def test_dry_run_graph_of_a_tiny_grid(tmp_path, tiny_model):
    """4 chains x merge none/slerp = 8 cells: 4 stages, 4 merges, 8 summaries (eval=none); the cell
    array's idle hours come from the cells that wait on CPT and CPT->SFT."""
    from dft.graph import Graph
    from dft.plan import load_plans

    # launcher=slurm (the graph launcher) plans a dry run here, in this process, and submits nothing
    p = run_train(["-m", "strategy=cpt,cpt_sft,cpt_sft_dpo,cpt_sft_orpo", "merge=none,slerp", *BASE,
                   "experiment=gdry", "dry_run=true", "launcher=slurm", "launcher.partition=nowhere"], tmp_path)
    assert not (tmp_path / "gdry" / ".submitit").exists() and "submits one job per cell" not in p.stderr
    plans = load_plans(tmp_path / "gdry")
    g = Graph.from_plans(plans)
    assert g.counts() == {"eval_start": 0, "stage": 4, "merge": 4, "eval": 0, "summary": 8}
    by_name = {n.name: n for n in g.nodes.values()}
    assert len(by_name["cpt"].cells) == 8 and len(by_name["cpt_sft"].cells) == 6
    assert by_name["cpt_sft_dpo+slerp"].parents == [by_name["cpt_sft_dpo"].id]
    assert by_name["cpt_sft"].parents == [by_name["cpt"].id]
    # stage keys are the plan's (which tests/test_grid.py checks against the trained keys)
    for pl in plans:
        for s in pl["stages"]:
            assert g.nodes[f"stage/{s['key']}"].gpu_hours == s["gpu_hours"]
    grid = json.loads((tmp_path / "gdry" / ".plan" / "_grid.json").read_text())
    lay = grid["layouts"]
    h = {n.name: n.gpu_hours for n in g.nodes.values() if n.kind == "stage"}
    assert lay["graph"]["idle_gpu_h"] == 0
    assert lay["graph"]["useful_gpu_h"] == pytest.approx(sum(h.values()))
    assert lay["graph"]["wall_h"] == pytest.approx(h["cpt"] + h["cpt_sft"] + max(h["cpt_sft_dpo"], h["cpt_sft_orpo"]))
    # one cell trains cpt while the 7 others wait for all of it; one of the 6 with SFT trains it while
    # 5 wait; DPO and ORPO are each shared by a merge=none and a merge=slerp cell: one waits
    assert lay["cells"]["idle_gpu_h"] == pytest.approx(7 * h["cpt"] + 5 * h["cpt_sft"] + h["cpt_sft_dpo"]
                                                       + h["cpt_sft_orpo"])
    assert "graph idle GPU-hours: 0; cell array idle GPU-hours: " in p.stdout
    assert "cell array (launcher=slurm_cells)" in p.stdout


@pytest.mark.slow
def test_paper_all_dry_run_prints_both_layouts_idle_hours(tmp_path):
    """~3-4 min on 2 cores (48 cells are composed and planned)."""
    # HF_HUB_OFFLINE=0: without the weights here a dry run under HF_HUB_OFFLINE=1 exits 2 (no cell can run)
    p = run_train(["-m", "grid=paper_all", "dry_run=true", "logger=none"], tmp_path, timeout=1500,
                  env={"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")})
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("graph idle GPU-hours: "))
    idle = float(line.split("cell array idle GPU-hours: ")[1].split()[0])
    assert line.startswith("graph idle GPU-hours: 0;") and idle > 0
    grid = json.loads((Path(tmp_path) / "paper_all" / ".plan" / "_grid.json").read_text())
    assert grid["layouts"]["graph"]["idle_gpu_h"] == 0
    assert grid["layouts"]["cells"]["idle_gpu_h"] == pytest.approx(idle, rel=5e-3)
    assert grid["layouts"]["cells"]["jobs"] == 48


# ------------------------------------------------------------------------------- the run executes the graph
def test_in_process_cell_runs_exactly_its_graph_nodes_in_topological_order(tmp_path, tiny_model):
    """A cell run in this process (what launcher=local and plain ``python -m dft.train`` do) walks the
    nodes of its plan's graph: every one of them once, each after its parents, and its summary holds
    one artefact per stage/merge node with the key of that node."""
    from conftest import compose
    from dft.graph import Graph
    from dft.pipeline import Cell
    from dft.plan import make_plan

    cfg = compose(["model=tiny", "data=tiny", "strategy=cpt_sft", "merge=slerp", "merge.at=each", "eval.stages=true",
                   "eval.max_items=2", "eval.perplexity=false", "eval.generate=false", "logger=none",
                   *[f"strategy.{s}.trainer.max_steps=1" for s in ("cpt", "sft")],
                   f"paths.stages={tmp_path / '_stages'}", f"paths.runs={tmp_path}"])
    g = Graph.from_plans([make_plan(Cell(cfg, tmp_path / "c", "c"))])
    assert g.counts() == {"eval_start": 1, "stage": 2, "merge": 2, "eval": 4, "summary": 1}
    cell = Cell(cfg, tmp_path / "c", "c")
    cell.run()
    assert sorted(cell.visited) == sorted(g.cells["c"]) and len(cell.visited) == len(set(cell.visited))
    pos = {i: k for k, i in enumerate(cell.visited)}
    assert all(pos[p] < pos[i] for i in cell.visited for p in g.nodes[i].parents)
    s = json.loads((tmp_path / "c" / "summary.json").read_text())
    made = {a["name"]: a["key"] for a in s["artefacts"] if a["kind"] in ("stage", "merge")}
    assert made == {n.name: n.key for n in g.nodes.values() if n.kind in ("stage", "merge")}
    assert [a["name"] for a in s["artefacts"]] == ["start", "cpt", "cpt+slerp", "cpt_sft", "cpt_sft+slerp"]
    # every evaluation node's result is in the summary (eval.stages=true: the stages and merges are evaluated)
    evaluated = {a["name"] for a in s["artefacts"] if a["metrics"]}
    assert evaluated == {n.name[len("eval("):-1] for n in g.nodes.values() if n.kind in ("eval", "eval_start")}
    # a second Cell on the same caches (a graph job's view) reuses everything: nothing trains
    again = Cell(cfg, tmp_path / "c2", "c2")
    again.run()
    assert again.cache.stats["trained"] == 0 and len(again.visited) == len(cell.visited)
