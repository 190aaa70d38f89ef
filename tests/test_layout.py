"""The layout the code keeps: stages/ holds exactly the DVC stages, over the posttrain library, over schemas;
no stage imports another, no private name crosses modules, no import cycle, and dvc.yaml's code deps are
each stage's import closure. posttrain/ is a handful of subpackages by concern with few top-level modules, and a
stage's code deps hold only code it can run: the launcher only in the launchable stages, the memory planner only
in the training ones. A normal stage run prints progress and results, not profiler noise."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys

import yaml
from conftest import REPO, make_workdir, tiny_params

from posttrain.core.stages_registry import STAGES, names
from posttrain.tools import depgraph

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def layer(module: str) -> str:
    return module.split(".")[0]


def test_stages_holds_exactly_the_dvc_stages_each_with_run_and_a_cli():
    modules = {p.stem for p in (REPO / "stages").glob("*.py")} - {"__init__"}
    assert modules == set(DVC)
    for name in modules:
        tree = ast.parse((REPO / "stages" / f"{name}.py").read_text())
        functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        mains = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
        assert "run" in functions and len(mains) == 1, name
        assert DVC[name]["cmd"] == f"python -m stages.{name}"


def test_stages_over_library_over_schemas_with_no_cycle():
    edges = depgraph.graph(REPO)
    allowed = {"stages": {"posttrain", "schemas"}, "posttrain": {"posttrain", "schemas"}, "schemas": {"schemas"},
               "flows": {"posttrain", "flows"}}
    for module, imported in edges.items():
        for other in imported:
            if other == layer(other):  # a package's own __init__
                continue
            assert layer(other) in allowed[layer(module)], f"{module} imports {other}"
    # no cycle among modules (a package's __init__ excluded: importing a.b runs a's __init__ first)
    graph = {m: {o for o in imported if o != layer(o) and o != m} for m, imported in edges.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]):
        state[m] = 1
        for o in graph.get(m, ()):
            assert state.get(o) != 1, "import cycle: " + " -> ".join(path + [m, o])
            if o not in state:
                visit(o, path + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_no_private_name_is_imported_from_another_module():
    for package in ("stages", "posttrain", "schemas", "flows", "bench"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and layer(node.module) in depgraph.PACKAGES:
                    private = [a.name for a in node.names if a.name.startswith("_")]
                    assert not private, f"{path.relative_to(REPO)} imports {private} from {node.module}"


def test_dvc_code_deps_equal_each_stages_import_closure():
    assert depgraph.differences(REPO, (REPO / "dvc.yaml").read_text()) == []


def test_depgraph_names_a_drifted_dep_and_rewrites_it(tmp_path):
    text = (REPO / "dvc.yaml").read_text().replace(" posttrain/model/lm_head.py,", "", 1)
    problems = depgraph.differences(REPO, text)
    assert problems and "posttrain/model/lm_head.py" in problems[0]
    assert depgraph.differences(REPO, depgraph.rewrite(text, depgraph.expected(REPO, text))) == []


SUBPACKAGES = {"core", "data", "model", "train", "evaluation", "export", "serving", "tools"}
LAUNCHER = {"posttrain.train.launch"}  # re-executes a stage under accelerate launch
MEMORY_PLANNER = {"posttrain.train.plan", "posttrain.train.memory", "posttrain.train.memory.estimate",
                  "posttrain.train.memory.measure"}


def test_posttrain_is_subpackages_by_concern_with_at_most_15_top_level_modules():
    top = REPO / "posttrain"
    modules = sorted(p.name for p in top.glob("*.py") if p.name != "__init__.py")
    assert len(modules) <= 15, modules
    # a folder left with only __pycache__ (a checkout from before the move) is no package
    packages = {p.parent.name for p in top.glob("*/__init__.py")}
    assert packages == SUBPACKAGES
    for name in packages:
        init = top / name / "__init__.py"
        # docstring-only, so importing one module does not run the others (and it is no stage's code dep)
        assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
                   for n in ast.parse(init.read_text()).body), init
    for module in LAUNCHER | MEMORY_PLANNER:
        assert depgraph.module_path(REPO, module) is not None, f"{module} moved: update this test"


def misplaced_code(edges: dict[str, set[str]]) -> list[str]:
    """Each stage that can execute code it never runs: the launcher where the registry says the stage is not
    launchable, the memory planner where it says the stage does not train."""
    problems = []
    for stage in STAGES:
        reach = depgraph.closure(edges, f"stages.{stage.name}")
        if not stage.launchable and reach & LAUNCHER:
            problems.append(f"{stage.name} imports the launcher {sorted(reach & LAUNCHER)}")
        if not stage.trains and reach & MEMORY_PLANNER:
            problems.append(f"{stage.name} imports the memory planner {sorted(reach & MEMORY_PLANNER)}")
    return problems


def test_each_stage_runs_only_code_it_can_use_the_launcher_and_memory_planner_stay_in_training():
    assert {"sample", "prepare", "base", "evaluate", "export"} <= set(names(launchable=False))
    assert set(names(launchable=False)) <= set(names(trains=False))
    edges = depgraph.graph(REPO)
    assert misplaced_code(edges) == []
    # dvc.yaml says the same (its code deps are each closure: test_dvc_code_deps_equal_each_stages_import_closure)
    files = {m: depgraph.module_path(REPO, m).relative_to(REPO).as_posix() for m in LAUNCHER | MEMORY_PLANNER}
    for name, stage in DVC.items():
        deps = {str(d) for d in stage["deps"]}
        if name in names(launchable=False):
            assert not deps & {files[m] for m in LAUNCHER}, name
        if name in names(trains=False):
            assert not deps & {files[m] for m in MEMORY_PLANNER}, name
    # and the check is not vacuous: every training stage does reach both
    for name in names(trains=True):
        reach = depgraph.closure(edges, f"stages.{name}")
        assert reach & LAUNCHER and reach & {"posttrain.train.memory.measure"}, name


def test_re_adding_the_launcher_or_the_planner_to_shared_code_fails_the_check():
    edges = depgraph.graph(REPO)
    # the stage command line every stage imports, importing the launcher again (even inside a function)
    edges["posttrain.core.cli"] = edges["posttrain.core.cli"] | {"posttrain.train.launch"}
    assert set(misplaced_code(edges)) >= {f"{s} imports the launcher ['posttrain.train.launch']"
                                           for s in ("sample", "prepare", "base", "evaluate", "export")}
    edges = depgraph.graph(REPO)
    edges["posttrain.model.loading"] = edges["posttrain.model.loading"] | {"posttrain.train.memory.estimate"}
    problems = misplaced_code(edges)
    assert any(p.startswith("evaluate imports the memory planner") for p in problems), problems
    assert any(p.startswith("export imports the memory planner") for p in problems), problems


def test_readme_is_short_and_its_docs_exist():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for link in [l.split("](")[1].split(")")[0] for l in readme.splitlines() if "](docs/" in l]:
        assert (REPO / link.split("#")[0]).is_file(), link


def test_a_training_stage_prints_no_profiler_or_allocator_noise(lifecycle, tmp_path):
    work = make_workdir(tmp_path / "w", tiny_params())
    for name in ("data/processed", "models/base"):
        shutil.copytree(lifecycle["workdir"] / name, work / name, dirs_exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "stages.cpt"], cwd=work, capture_output=True, text=True,
                          env=os.environ.copy(), timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert '"perplexity_after"' in proc.stdout  # the results are printed
    for noise in ("USDT", "profiler_start", "CPUAllocator", "Memory block of unknown size"):
        assert noise not in out, noise
