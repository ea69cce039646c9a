"""The architecture contract: the layout by concern, checked on every run of the suite.

import-linter's contracts (setup.cfg, `[importlinter]`): tfmp's packages import
downwards only, no circle between the modules of a package, only tfmp imports its
Keras fence (`tfmp._compat`), and the library never reaches into the application.
Also: the library never imports the package root, `import tfmp` does not load the
training job, the public API is curated and documented, modules stay small.
"""

import ast
import importlib
import inspect
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import textwrap

import keras
import pytest

import helpers
import tfmp

PACKAGE = os.path.join(helpers.ROOT, "tfmp")
LIBRARY = ("precision", "scaling", "layers", "rewrite", "callbacks", "measure", "distribute",
           "litert", "weights", "compensation", "preparation", "atomic", "_compat", "_messages",
           "_tf_check")
MAX_LINES = 400


def _lint_imports(root):
    # `lint-imports` is the console script; run its entry point with this interpreter.
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--no-cache"], cwd=root,
                          capture_output=True, text=True, timeout=120)


def test_the_import_contracts_hold():
    proc = _lint_imports(helpers.ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "Contracts: 4 kept, 0 broken." in proc.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("tfmp/scaling/numerics.py", "from tfmp.app import training", "import downwards only"),
    ("tfmp/precision/hardware.py", "from tfmp.precision import policy", "no circle"),
    ("tools/audit.py", "from tfmp import _compat", "Keras' internals"),
    ("benchmarks/bench.py", "from tfmp._messages import first_line", "Keras' internals"),
    ("tfmp/weights/half.py", "from benchmarks import interleave", "does not reach into"),
    ("tfmp/_messages.py", "import tools.audit", "does not reach into"),
])
def test_the_contracts_catch_an_upward_import_a_circle_and_a_breach_of_the_fence(
        tmp_path, module, line, contract):
    for name in ("tfmp", "tools", "models", "benchmarks"):
        shutil.copytree(os.path.join(helpers.ROOT, name), tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(helpers.ROOT, "setup.cfg"), tmp_path)
    with open(tmp_path / module, "a") as f:
        f.write(f"\n{line}  # the violation\n")
    proc = _lint_imports(tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:]
    broken = proc.stdout.split("Broken contracts")[1]
    assert contract in broken, proc.stdout[-3000:]


def _library_modules():
    for name in LIBRARY:
        path = os.path.join(PACKAGE, name)
        if os.path.isdir(path):
            for root, _, files in os.walk(path):
                yield from (os.path.join(root, f) for f in files if f.endswith(".py"))
        else:
            yield path + ".py"


FENCED = re.compile(r"^(keras\.src|tensorflow\.python|tf\.python)\b|(^|\.)compat\.v1\b")


def _fenced_names(node):
    """The dotted names `node` uses that the fence could be about: what an import brings in
    (`from keras import src` is `keras.src`), an attribute chain, a string constant."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        return [f"{node.module}.{a.name}" for a in node.names]
    if isinstance(node, ast.Attribute):
        return [ast.unparse(node)]
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]  # importlib.import_module("keras.src...")
    return []


def _breaches_of_the_fence(root):
    """`path:line: name` for every use of Keras' private modules, TensorFlow's private
    `tensorflow.python` or its v1 API outside `tfmp/_compat`."""
    found = []
    for top in ("tfmp", "tools", "models", "benchmarks"):
        for path, _, files in os.walk(os.path.join(root, top)):
            if os.path.join("tfmp", "_compat") in path:
                continue
            for f in (f for f in files if f.endswith(".py")):
                tree = ast.parse(open(os.path.join(path, f)).read())
                for node in ast.walk(tree):
                    found += [f"{os.path.join(path, f)}:{node.lineno}: {n}"
                              for n in _fenced_names(node) if FENCED.search(n)]
    return found


# Keras' classes whose private methods are hooks Keras calls on itself: a mixin that only
# meets them at run time (`tfmp.compensate` makes its class with `type()`) is checked
# against them too.
KERAS_BASES = (keras.optimizers.Optimizer, keras.layers.Layer, keras.Model,
               keras.callbacks.Callback, keras.metrics.Metric, keras.losses.Loss)


def _private_overrides(classes):
    """`Class.method` for every method that overrides a private (`_x`) method of a Keras or
    TensorFlow class: a hook Keras calls on itself, which only `tfmp._compat` may rely on."""
    found = []
    for cls in classes:
        if cls.__module__.startswith("tfmp._compat"):
            continue
        theirs = [b for b in cls.__mro__[1:] if b.__module__.split(".")[0] in ("keras", "tensorflow")]
        theirs = theirs or [b for k in KERAS_BASES for b in k.__mro__]
        for name in vars(cls):
            if name.startswith("_") and not name.startswith("__") and any(
                    name in vars(b) for b in theirs):
                found.append(f"{cls.__module__}.{cls.__qualname__}.{name}")
    return found


def _tfmp_classes():
    for info in pkgutil.walk_packages(tfmp.__path__, "tfmp."):
        module = importlib.import_module(info.name)
        yield from (obj for obj in vars(module).values()
                    if inspect.isclass(obj) and obj.__module__ == info.name)


def test_only_the_fence_touches_keras_internals_and_tensorflow_v1():
    assert not _breaches_of_the_fence(helpers.ROOT)
    assert not _private_overrides(_tfmp_classes())


def test_the_fence_check_catches_a_private_module_a_v1_call_and_a_private_hook(tmp_path):
    planted = tmp_path / "tfmp" / "rewrite"
    planted.mkdir(parents=True)
    (planted / "bad.py").write_text(
        "import importlib\nimport tensorflow as tf\nfrom keras.src import ops\n"
        "from keras import src\nfrom tensorflow import compat\n"
        "from tensorflow.python.framework import ops as tf_ops\n"
        "graph = tf.compat.v1.get_default_graph()\ngraph = compat.v1.get_default_graph()\n"
        "backend = importlib.import_module('keras.src.backend')\n")
    lines = sorted({int(b.split(":")[1]) for b in _breaches_of_the_fence(tmp_path)})
    assert lines == [3, 4, 6, 7, 8, 9]  # every line but the plain imports

    class Backup(keras.callbacks.BackupAndRestore):
        def _save_model(self):  # Keras' private save hook
            pass

    class Mixin:  # meets a Keras optimizer only at run time, as CompensatedOptimizer does
        def _backend_update_step(self, grads, trainable_variables, learning_rate):
            pass

    assert _private_overrides([Backup, Mixin]) == [
        f"{__name__}.{Backup.__qualname__}._save_model",
        f"{__name__}.{Mixin.__qualname__}._backend_update_step"]


def test_the_library_never_imports_the_package_root():
    # `import tfmp` (or `from tfmp import <name>` of a top-level function) in a library
    # module would make it depend on everything above it, around the contracts.
    submodules = {m.name for m in pkgutil.iter_modules(tfmp.__path__)}
    offenders = []
    for path in _library_modules():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import) and any(a.name == "tfmp" for a in node.names):
                offenders.append(f"{path}: import tfmp")
            if isinstance(node, ast.ImportFrom) and node.module == "tfmp":
                offenders += [f"{path}: from tfmp import {a.name}" for a in node.names
                              if a.name not in submodules]
    assert not offenders, offenders


def test_import_tfmp_does_not_load_the_training_job():
    code = ("import sys, tfmp; loaded = sorted(m for m in sys.modules if m.startswith('tfmp.app')"
            " or m == 'tensorflow_datasets'); print(loaded)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=helpers.ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


NAMESPACES = ("callbacks", "compensation", "distribute", "layers", "litert", "measure",
              "precision", "rewrite", "scaling", "weights")


def test_a_curated_top_level_and_namespaces_for_the_rest():
    names = [n for n in tfmp.__all__ if n not in NAMESPACES]
    assert 18 <= len(names) <= 24, names
    for name in tfmp.__all__:
        assert getattr(tfmp, name) is not None
    assert set(NAMESPACES) <= set(tfmp.__all__)


def _namespaces():
    yield tfmp
    for name in NAMESPACES:
        yield getattr(tfmp, name)


def test_no_public_name_shadows_its_own_module():
    # `tfmp.export` the function over a module `tfmp/export.py`: `import tfmp.export`
    # would then replace the function by the module for everyone.
    for namespace in _namespaces():
        if not hasattr(namespace, "__path__"):
            continue
        submodules = {m.name for m in pkgutil.iter_modules(namespace.__path__)}
        shadowing = [n for n in getattr(namespace, "__all__", []) if n in submodules
                     and not inspect.ismodule(getattr(namespace, n))]
        assert not shadowing, f"{namespace.__name__}: {shadowing}"


def _public_callables():
    seen = set()
    for namespace in [*_namespaces(), *(importlib.import_module(m) for m in USER_MODULES)]:
        for name in getattr(namespace, "__all__", [n for n in vars(namespace)
                                                  if not n.startswith("_")]):
            obj = getattr(namespace, name)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__.startswith(
                    "tfmp") and id(obj) not in seen:
                seen.add(id(obj))
                yield f"{namespace.__name__}.{name}", obj


def _parameters(fn):
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    return [p for p in signature.parameters.values() if p.name not in ("self", "cls")]


def _returns_a_value(fn):
    """Whether `fn`'s own body (not a nested function's) returns something other than None."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError):
        return False
    nodes = list(ast.iter_child_nodes(tree.body[0]))
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.Return) and node.value is not None and not (
                isinstance(node.value, ast.Constant) and node.value.value is None):
            return True
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            nodes.extend(ast.iter_child_nodes(node))
    return False


def test_a_value_returned_without_an_annotation_is_seen():
    def returns(x):
        if x:
            return None
        return x + 1

    def returns_nothing(x):
        def inner():
            return 1
        return None

    assert _returns_a_value(returns) and not _returns_a_value(returns_nothing)


def test_every_public_function_says_its_args_returns_and_raises():
    missing = []
    for path, obj in _public_callables():
        doc = inspect.getdoc(obj) or ""
        if inspect.isclass(obj):
            init = obj.__dict__.get("__init__")
            if init is not None and _parameters(init) and not any(
                    k in doc for k in ("Args:", "Attributes:")):
                missing.append(f"{path}: no Args:/Attributes:")
            continue
        if _parameters(obj) and "Args:" not in doc:
            missing.append(f"{path}: no Args:")
        returns = inspect.signature(obj).return_annotation
        if (returns not in (None, "None", inspect.Signature.empty) or _returns_a_value(obj)) and not any(
                k in doc for k in ("Returns:", "Yields:")):
            missing.append(f"{path}: no Returns:")
        if "raise " in inspect.getsource(obj) and "Raises:" not in doc:
            missing.append(f"{path}: raises, no Raises:")
    assert not missing, "\n".join(missing)


def test_no_module_over_400_lines():
    for root in ("tfmp", "tools", "models", "benchmarks"):
        for path, _, files in os.walk(os.path.join(helpers.ROOT, root)):
            for f in files:
                if f.endswith(".py"):
                    with open(os.path.join(path, f)) as text:
                        lines = len(text.readlines())
                    assert lines <= MAX_LINES, f"{os.path.join(path, f)}: {lines} lines"


MAX_PUBLIC_NAMES = 90
USER_MODULES = ("tfmp.app.flags",)  # public modules `import tfmp` does not load


def _public_names():
    """`{(namespace, name): object}` for every name of an `__all__` users see (modules aside)."""
    modules = [*_namespaces(), *(importlib.import_module(m) for m in USER_MODULES)]
    return {(m.__name__, n): getattr(m, n) for m in modules for n in m.__all__
            if not inspect.ismodule(getattr(m, n))}


def _docs_code():
    """The code in README.md and docs/*.md: fenced blocks and inline `code`, not the prose."""
    paths = [os.path.join(helpers.ROOT, "README.md")]
    docs = os.path.join(helpers.ROOT, "docs")
    paths += [os.path.join(docs, f) for f in sorted(os.listdir(docs)) if f.endswith(".md")]
    text = "\n".join(open(p).read() for p in paths)
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))
    return "\n".join(fenced + inline)


def _user_facing_test_text():
    """The tests' imports and attribute paths that go through a public namespace."""
    found = []
    for root, _, files in os.walk(os.path.join(helpers.ROOT, "tests")):
        for f in files:
            if f.endswith(".py"):
                tree = ast.parse(open(os.path.join(root, f)).read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.ImportFrom) and node.module:
                        found += [f"{node.module}.{a.name}" for a in node.names]
                    elif isinstance(node, ast.Attribute):
                        found.append(ast.unparse(node))
    return found


def test_the_public_surface_is_small_and_every_name_is_shown_to_users():
    # `__all__` is what users call and the types they receive; the library imports its
    # helpers by module path. A public name no guide shows and no test calls the way a user
    # would (through its namespace) is not public.
    names = _public_names()
    assert len({id(obj) for obj in names.values()}) <= MAX_PUBLIC_NAMES, sorted(names)
    shown = _qualified(_docs_code()) | set(_user_facing_test_text())
    shown_objects = {id(obj) for (ns, name), obj in names.items() if f"{ns}.{name}" in shown}
    unseen = [f"{ns}.{name}" for (ns, name), obj in names.items() if id(obj) not in shown_objects]
    assert not unseen, unseen


def _qualified(code):
    """Every `tfmp.x.y` path the code names (and their prefixes), through `import ... as`
    aliases and `from tfmp.x import y` too."""
    for module, name, alias in re.findall(r"from (tfmp[\w.]*) import (\w+) as (\w+)", code):
        code = re.sub(rf"\b{alias}\.", f"{module}.{name}.", code)
    paths = set(re.findall(r"\btfmp(?:\.\w+)+", code))
    for module, listed in re.findall(r"from (tfmp[\w.]*) import \(?([\w, \n]+)\)?", code):
        paths |= {f"{module}.{n.strip()}" for n in listed.split(",") if n.strip()}
    return {".".join(p.split(".")[:i]) for p in paths for i in range(2, p.count(".") + 2)}


def test_a_namespace_holds_only_its_public_names():
    # A helper imported into a namespace's __init__ would be reachable as if public.
    for namespace in _namespaces():
        if namespace is tfmp or not hasattr(namespace, "__path__"):
            continue
        extra = [n for n, v in vars(namespace).items() if not n.startswith("_")
                 and not inspect.ismodule(v) and n not in namespace.__all__]
        assert not extra, f"{namespace.__name__}: {extra}"


def test_every_namespace_exports_what_exists():
    for namespace in _namespaces():
        for name in getattr(namespace, "__all__", []):
            assert hasattr(namespace, name), f"{namespace.__name__}.{name}"
    for module in ("tfmp.app.config", "tfmp.app.training", "tfmp.app.data", "tfmp.app.run_dir",
                   "tfmp.app.saved_models", "tfmp.app.exporting", "tfmp.app.cli"):
        importlib.import_module(module)
