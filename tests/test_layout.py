"""The house's rules, checked on the source: no import circles, imports only go down the
layers the README's "Layout" section draws, and no module outside tests is too long to read
in one sitting without saying why at its top."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("tasks", "models", "flows")
# The dataset stages: they make the data, so they sit below what trains on it and looks at it.
DATASET = {"ingest", "bucket", "caption", "embed_text", "embed_image", "embed_pose", "shard", "latents"}
# Packages of tasks/ that may read a dataset stage's params and item functions (to encode a
# prompt, an image or a pose as the stage did, or to read its table).
TRAINER_SIDE = {"nanodit", "sdxl", "report"}
MAX_LINES = 400
LONG_REASON = "Long on purpose:"  # a module over MAX_LINES says why in its docstring, starting so


def modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if "tiny" in path.relative_to(ROOT).parts[:2] and path.parts[-2] == "tiny":
                continue  # models/tiny/ holds built models, not code
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            found[".".join(parts)] = path
    return found


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every project module `path` imports, at the top or inside a function (a lazy import is
    still a dependency)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(path, name, known) for name, path in mods.items()}


def layer(mod: str) -> tuple[str, str]:
    """(kind, name): flows, command (a tasks/<x>.py entry), dataset (a dataset stage's entry),
    package (tasks/<pkg>/), core, models."""
    parts = mod.split(".")
    if parts[0] == "flows":
        return "flows", mod
    if parts[0] == "models":
        return "models", mod
    if len(parts) == 1:
        return "package", "tasks"
    if parts[1] == "core":
        return "core", mod
    if parts[1] == "sample":
        return "command", "sample"
    if len(parts) == 2 and not (ROOT / "tasks" / parts[1]).is_dir():
        return ("dataset" if parts[1] in DATASET else "command"), parts[1]
    return "package", parts[1]


def test_no_import_circles():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(g[m]):
            if d.split(".")[0] not in PACKAGES or d not in g:
                continue
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d] if d in stack else [m, d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_imports_only_go_down_the_layers():
    """flows → tasks commands → tasks packages (nanodit, sdxl, report) → dataset stage entries →
    tasks packages below them (data, training) → tasks.core → models; models import no tasks."""
    below = {  # what each kind may import besides its own kind's own module
        "models": {"models"},
        "core": {"core", "models"},
        "dataset": {"dataset", "core", "low", "models"},
        "low": {"core", "low", "models"},  # tasks/data, tasks/training
        "trainer": {"trainer", "dataset", "low", "core", "models"},
        "command": {"command", "trainer", "dataset", "low", "core", "models"},
        "flows": {"flows", "command", "trainer", "dataset", "low", "core", "models"},
    }

    def kind(mod: str) -> str:
        k, name = layer(mod)
        if k == "package":
            return "trainer" if name in TRAINER_SIDE else "low"
        return k

    wrong = []
    for mod, deps in graph().items():
        for d in deps:
            if kind(d) not in below[kind(mod)] or (kind(mod) == "command" and kind(d) == "command"
                                                   and layer(d)[1] != "sample"):
                wrong.append(f"{mod} ({kind(mod)}) imports {d} ({kind(d)})")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_every_package_says_what_lives_there_and_what_it_may_import():
    for init in sorted(list((ROOT / "tasks").glob("*/__init__.py")) + list((ROOT / "models").glob("*/__init__.py"))):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        assert "May import" in doc, f"{init.relative_to(ROOT)}: its docstring says nothing of what it may import"


def test_no_module_is_too_long_without_saying_why():
    long = []
    for path in [p for pkg in (*PACKAGES, "bench") for p in (ROOT / pkg).rglob("*.py")]:
        n = len(path.read_text(encoding="utf-8").splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        if n > MAX_LINES and LONG_REASON not in doc:
            long.append(f"{path.relative_to(ROOT)}: {n} lines")
    assert not long, f"over {MAX_LINES} lines with no '{LONG_REASON}' in the docstring:\n" + "\n".join(long)


def test_the_checks_see_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The graph reader finds lazy and relative imports, or the checks above prove nothing."""
    pkg = tmp_path / "tasks"
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("def f():\n    from tasks import train\n")
    (pkg / "train.py").write_text("from .core import a\n")
    known = {"tasks", "tasks.core", "tasks.core.a", "tasks.train"}
    assert imports(pkg / "core" / "a.py", "tasks.core.a", known) == {"tasks.train"}
    assert imports(pkg / "train.py", "tasks.train", known) == {"tasks.core.a"}
    assert layer("tasks.core.a")[0] == "core" and layer("tasks.train") == ("command", "train")
