"""The layout: dni/ is the library, dnilab/ the application that trains with it, experiments/
built on both; never the other way round.

- no module of dni/ imports dnilab or experiments, and no module of dnilab/ imports experiments
  (any form: import, from-import, relative, importlib);
- every module of dni/ imports with numpy, tqdm and matplotlib missing: the library needs torch alone;
- no import cycle among dni/'s modules, nor among dnilab/'s, counting imports inside functions
  too (a cycle that only a late import keeps from failing is still two modules that need each other);
- `import dni` and `import dnilab` work from outside the repository once `pip install -e .` has run.
"""
import ast
import shutil
import site
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "dni"
APPLICATION = ROOT / "dnilab"
OURS = ("dni", "dnilab", "experiments")


def module_name(path, root=ROOT):
    """dnilab/train.py -> 'dnilab.train'; dni/__init__.py -> 'dni'."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path, root=ROOT):
    """Every module name `path` imports, at module level or inside a function: `import a.b` gives
    'a.b'; `from a import b` gives 'a' and 'a.b' (b may be a submodule); relative imports are made
    absolute; `importlib.import_module("a.b")` and `__import__("a.b")` with a literal give 'a.b'."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__"):
                names.add(node.args[0].value)
    return names


def package_modules(folder):
    return {module_name(p): p for p in sorted(folder.glob("*.py"))}


def library_modules():
    return package_modules(LIBRARY)


def imports_of(modules, packages):
    """{module: the names it imports from any of `packages`}, for the modules that import any."""
    found = {name: sorted(n for n in imported_names(path) if n.split(".")[0] in packages)
             for name, path in modules.items()}
    return {name: names for name, names in found.items() if names}


def test_the_library_imports_nothing_of_ours_but_itself():
    offenders = imports_of(library_modules(), [p for p in OURS if p != "dni"])
    assert not offenders, f"dni/ must import neither dnilab nor experiments: {offenders}"


def test_the_application_imports_no_experiment():
    offenders = imports_of(package_modules(APPLICATION), ["experiments"])
    assert not offenders, f"dnilab/ must not import experiments/: {offenders}"


BLOCKED = ("numpy", "tqdm", "matplotlib")


def test_the_library_imports_with_torch_alone():
    """Every module of dni/, imported in a fresh interpreter in which numpy, tqdm and matplotlib
    raise ModuleNotFoundError (torch itself gets on without numpy)."""
    names = sorted(library_modules())
    code = ("import importlib, importlib.abc, sys\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            f"        if name.split('.')[0] in {BLOCKED!r}:\n"
            "            raise ModuleNotFoundError(f'blocked: {name}')\n"
            "sys.meta_path.insert(0, Block())\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            f"assert not [m for m in sys.modules if m.split('.')[0] in {BLOCKED!r} + ('dnilab', 'experiments')]\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_blocked_import_check_catches_a_module_that_needs_numpy(tmp_path):
    """The same check on a probe package whose module imports numpy: it must fail."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "__init__.py").write_text("")
    (probe / "uses_numpy.py").write_text("import numpy\n")
    code = ("import importlib.abc, sys\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            f"        if name.split('.')[0] in {BLOCKED!r}:\n"
            "            raise ModuleNotFoundError(f'blocked: {name}')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import probe.uses_numpy\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "blocked: numpy" in done.stderr


def test_the_checker_sees_every_form_of_import(tmp_path):
    source = tmp_path / "dni" / "probe.py"
    source.parent.mkdir()
    source.write_text("import experiments.table1\n"
                      "def f():\n    from experiments import search\n    from . import train\n"
                      "    from .runs import write_json\n"
                      "    importlib.import_module('experiments.bench')\n")
    names = imported_names(source, root=tmp_path)
    assert {"experiments.table1", "experiments", "experiments.search", "dni.train", "dni.runs",
            "experiments.bench"} <= names


def find_cycle(graph):
    """A list [a, b, ..., a] of modules that import each other in a ring, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


@pytest.mark.parametrize("folder", [LIBRARY, APPLICATION], ids=["dni", "dnilab"])
def test_no_import_cycle_within_a_package(folder):
    modules = package_modules(folder)
    # Importing dni.x runs the package's __init__ first; that is Python's order, not an edge.
    graph = {name: {n for n in imported_names(path) if n in modules and n != name and n != folder.name}
             for name, path in modules.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_a_ring_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def copy_of_the_project(dest):
    """pyproject.toml, README.md and the packages pyproject lists, copied to `dest`: pip writes
    its egg-info and build files beside the sources, and the checkout must stay as it is."""
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    for package in {p.split(".")[0] for p in listed}:
        shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.mark.skipif(not (ROOT / "pyproject.toml").exists(), reason="no pyproject.toml yet: pip install -e . needs one")
def test_an_editable_install_imports_dni_from_anywhere(tmp_path):
    """pip install -e into a fresh environment, nothing downloaded, then the library and the
    application from a folder outside the project: the packages alone, without experiments/ on
    the path.

    The new environment sees the packages of the Python running this test (install.sh's: torch,
    and a setuptools that builds editable wheels by itself) through a .pth file, not the host's
    system site-packages, which may hold another setuptools (a venv's own starts at 65.5, with no
    bdist_wheel). A path in a .pth file is only searched, so editable installs of that Python do
    not leak in. It installs a copy of the project, so nothing is written into the checkout."""
    project = copy_of_the_project(tmp_path / "project")
    env = tmp_path / "venv"
    venv.create(env, system_site_packages=False, with_pip=False)
    python = env / ("Scripts" if sys.platform == "win32" else "bin") / "python"
    site_dir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in site.getsitepackages() + [site.getusersitepackages()] if Path(p).is_dir()]
    (Path(site_dir) / "zz_running_python.pth").write_text("\n".join(ours) + "\n")
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                              "--no-index", "-e", str(project)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    code = ("import dni, dni.interface, dni.synthesizers, dnilab.train, dnilab.pipeline, dnilab.recurrent; "
            "from pathlib import Path; "
            f"assert Path(dni.__file__).resolve().parent == Path({str(project / 'dni')!r}), dni.__file__; "
            "import importlib.util; assert importlib.util.find_spec('experiments') is None; print('ok')")
    done = subprocess.run([str(python), "-c", code], cwd=outside, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
