"""depgraph: the repository's own import graph, and dvc.yaml's code deps generated from it.

    python -m posttrain.tools.depgraph            # rewrite each stage's code deps in dvc.yaml (data deps kept)
    python -m posttrain.tools.depgraph --check    # exit 1 and name the difference if dvc.yaml has drifted

A stage's code deps are its module's import closure within the repository (every `import` in the file,
function-level ones too), so editing a module re-runs exactly the stages that can execute it. The check also
holds dvc.yaml to the stage registry (posttrain.core.stages_registry): the same stages, and each stage's `defaults.*`
params the shared blocks the registry says it reads.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

PACKAGES = ("stages", "posttrain", "schemas", "flows")


def module_path(root: Path, name: str) -> Path | None:
    p = root.joinpath(*name.split("."))
    if p.with_suffix(".py").is_file():
        return p.with_suffix(".py")
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    return None


def imports_of(root: Path, path: Path) -> set[str]:
    """The repository modules `path` imports (`from a.b import c` counts a.b, and a.b.c where that is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    mods = set()
    for name in found:
        if name.split(".")[0] not in PACKAGES:
            continue
        parts = name.split(".")  # a package's __init__ runs on the way to its modules
        mods.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {m for m in mods if module_path(root, m) is not None}


def graph(root: Path) -> dict[str, set[str]]:
    """module -> the repository modules it imports, for every module of PACKAGES."""
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            out[name] = imports_of(root, path)
    return out


def closure(edges: dict[str, set[str]], module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(edges.get(m, ()))
    return seen


def code_deps(root: Path, edges: dict[str, set[str]], module: str) -> list[str]:
    """The files a stage module can execute, in a stable order (its own file first)."""
    files = {module_path(root, m).relative_to(root).as_posix() for m in closure(edges, module)}
    own = module_path(root, module).relative_to(root).as_posix()
    return [own] + sorted(f for f in files - {own} if not _empty_init(root / f))


def _empty_init(path: Path) -> bool:
    """A package's __init__ that holds only a docstring: editing it changes nothing a stage runs."""
    if path.name != "__init__.py":
        return False
    body = ast.parse(path.read_text()).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def stage_modules(dvc_text: str) -> dict[str, str]:
    """stage name -> the module its cmd runs (`python -m stages.<name>`)."""
    import yaml

    stages = yaml.safe_load(dvc_text)["stages"]
    out = {}
    for name, stage in stages.items():
        found = re.findall(r"-m\s+(stages\.\w+)", stage["cmd"])
        if len(found) != 1:
            raise SystemExit(f"depgraph: stage {name}: expected one `-m stages.<module>` in its cmd, got {found}")
        out[name] = found[0]
    return out


def expected(root: Path, dvc_text: str) -> dict[str, list[str]]:
    """stage -> its code deps followed by its data deps (the non-code deps dvc.yaml already lists)."""
    import yaml

    edges = graph(root)
    stages = yaml.safe_load(dvc_text)["stages"]
    out = {}
    for name, module in stage_modules(dvc_text).items():
        data = [str(d) for d in stages[name].get("deps", []) if not _is_code(str(d))]
        out[name] = code_deps(root, edges, module) + data
    return out


def _is_code(dep: str) -> bool:
    """A module or package folder of the repository; a package's data file (posttrain/export/templates/*.md) is a
    data dep."""
    return dep.endswith(".py") or (dep.split("/")[0] in PACKAGES and "." not in dep.rsplit("/", 1)[-1])


def differences(root: Path, dvc_text: str) -> list[str]:
    import yaml

    stages = yaml.safe_load(dvc_text)["stages"]
    problems = []
    for name, deps in expected(root, dvc_text).items():
        listed = [str(d) for d in stages[name].get("deps", []) if _is_code(str(d))]
        want = [d for d in deps if _is_code(d)]
        if set(listed) != set(want):
            missing, extra = sorted(set(want) - set(listed)), sorted(set(listed) - set(want))
            problems.append(f"{name}: missing {missing}, not imported {extra}")
    return problems


def registry_differences(dvc_text: str) -> list[str]:
    """Where dvc.yaml's stages or their `defaults.<block>` params disagree with posttrain.core.stages_registry."""
    import yaml

    from posttrain.core.stages_registry import BY_NAME

    stages = yaml.safe_load(dvc_text)["stages"]
    registry = "posttrain/core/stages_registry.py"
    problems = [f"{name}: in dvc.yaml, not in {registry}" for name in stages if name not in BY_NAME]
    problems += [f"{name}: in {registry}, not in dvc.yaml" for name in BY_NAME if name not in stages]
    for name in (n for n in stages if n in BY_NAME):
        listed = {p.removeprefix("defaults.") for p in stages[name].get("params", [])
                  if isinstance(p, str) and p.startswith("defaults.")}
        if listed != set(BY_NAME[name].shared):
            problems.append(f"{name}: dvc.yaml params read defaults {sorted(listed)}, "
                            f"the registry says {sorted(BY_NAME[name].shared)}")
    return problems


def rewrite(dvc_text: str, deps: dict[str, list[str]]) -> str:
    """dvc.yaml with each stage's `deps: [...]` line replaced (one line per stage, comments kept)."""
    out, stage = [], None
    for line in dvc_text.splitlines(keepends=True):
        m = re.match(r"^  (\w+):\s*(#.*)?$", line)
        if m:
            stage = m.group(1)
        dm = re.match(r"^(\s+)deps:\s*\[.*\]\s*$", line)
        if dm and stage in deps:
            items = ", ".join(f'"{d}"' if "$" in d else d for d in deps[stage])
            line = f"{dm.group(1)}deps: [{items}]\n"
        out.append(line)
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posttrain.tools.depgraph", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    parser.add_argument("--dvc-file", default="dvc.yaml")
    args = parser.parse_args(argv)
    root, dvc_file = Path("."), Path(args.dvc_file)
    text = dvc_file.read_text()
    if args.check:
        problems = differences(root, text) + registry_differences(text)
        for p in problems:
            print(p)
        print("dvc.yaml's code deps equal each stage's import closure" if not problems else
              f"{len(problems)} stage(s) differ: run python -m posttrain.tools.depgraph")
        return 1 if problems else 0
    dvc_file.write_text(rewrite(text, expected(root, text)))
    print(f"{dvc_file}: code deps written from the import graph")
    return 0


if __name__ == "__main__":
    sys.exit(main())
