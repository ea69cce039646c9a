"""Keras' own tests of a class, run against the tfmp class that replaces it.

Keras ships its tests in its wheel, beside each module (`keras/src/optimizers/
loss_scale_optimizer_test.py` beside `loss_scale_optimizer.py`). `load` reads the test
file of the *installed* Keras (a new release brings its new tests), replaces every
reference to the Keras class with the tfmp class, whatever import the file uses
(`from m import Class [as Alias]`, `module.Class`), compiles the result under the Keras
file's own name (a failure shows Keras' file, line and assertion) and returns its test
cases, for a test module to put in its namespace, where pytest collects them:

    globals().update(keras_suite.load(keras.callbacks.BackupAndRestore,
                                      tfmp.callbacks.SafeBackupAndRestore, deselect={}).cases)

Nothing is skipped silently. A Keras test that fails fails here; one listed in `deselect`
(what tfmp changes on purpose) is a strict xfail: it must fail with an `AssertionError`
(Keras' assertion), and it fails the suite when it passes or no longer exists. A test file
that is missing, or that never names the Keras class (nothing would be replaced), raises
when the test module is collected.
"""

import ast
import dataclasses
import inspect
import os
import types
import unittest

import keras
import pytest


@dataclasses.dataclass(frozen=True)
class Suite:
    """Keras' test file of one class, its references to that class replaced.

    Attributes:
        path: The installed Keras test file.
        module: The module it was run as.
        replaced: How many references to the Keras class were replaced.
        cases: Its `unittest.TestCase` classes and `test*` functions, by name.
        code: The module's compiled code.
    """

    path: str
    module: types.ModuleType
    replaced: int
    cases: dict
    code: types.CodeType


class _Replace(ast.NodeTransformer):
    """`from m import Name [as alias]` and `<expr>.Name`, for the class `Name`: the first
    binds `alias` to the replacement (the import is dropped), the second reads `global_name`."""

    def __init__(self, name, global_name):
        self.name, self.global_name = name, global_name
        self.aliases, self.attributes = [], 0

    def visit_ImportFrom(self, node):
        kept = [alias for alias in node.names if alias.name != self.name]
        self.aliases += [alias.asname or alias.name for alias in node.names
                         if alias.name == self.name]
        if len(kept) == len(node.names):
            return node
        node.names = kept
        return node if kept else ast.copy_location(ast.Pass(), node)

    def visit_Attribute(self, node):
        self.generic_visit(node)
        if node.attr != self.name or not isinstance(node.ctx, ast.Load):
            return node
        self.attributes += 1
        return ast.copy_location(ast.Name(id=self.global_name, ctx=ast.Load()), node)


def keras_test_file(keras_class):
    """The installed Keras test file of `keras_class`: `<its module>_test.py` beside it."""
    return inspect.getsourcefile(keras_class)[:-len(".py")] + "_test.py"


def load(keras_class, tfmp_class, deselect, path=None):
    """Keras' tests of `keras_class`, run on `tfmp_class`.

    Args:
        keras_class: The Keras class (`keras.optimizers.LossScaleOptimizer`).
        tfmp_class: The tfmp class that replaces it.
        deselect: `{test method name: why}`, the tests that pin what tfmp changes on
            purpose; each becomes a strict xfail expecting Keras' `AssertionError`.
        path: The test file, if not `keras_test_file(keras_class)`.

    Returns:
        A `Suite`.

    Raises:
        FileNotFoundError: Keras ships no test file for the class.
        ValueError: the file never names the class, or a deselected test is not in it.
    """
    path = path or keras_test_file(keras_class)
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    name = keras_class.__name__
    replace = _Replace(name, f"_tfmp_replaces_{name}")
    tree = ast.fix_missing_locations(replace.visit(tree))
    replaced = len(replace.aliases) + replace.attributes
    if not replaced:
        raise ValueError(f"{path} never names {name}: nothing to replace with "
                         f"{tfmp_class.__name__} (has Keras changed how its test imports it?)")
    module = types.ModuleType(f"keras_suite.{os.path.basename(path)[:-len('.py')]}")
    module.__file__ = path
    for alias in [replace.global_name, *replace.aliases]:
        setattr(module, alias, tfmp_class)
    code = compile(tree, path, "exec")
    exec(code, module.__dict__)
    cases = {key: value for key, value in vars(module).items()
             if (isinstance(value, type) and issubclass(value, unittest.TestCase))
             or (key.startswith("test") and inspect.isfunction(value))}
    _mark_deselected(cases, deselect, path)
    return Suite(path, module, replaced, cases, code)


def check(suite, tfmp_class):
    """Raises `AssertionError` unless `suite` runs Keras' own test cases on `tfmp_class`, on
    the TensorFlow backend: Keras' `TestCase` base, the class replaced and read as tfmp's."""
    from keras.src.testing import TestCase  # the base of Keras' own tests, as they import it

    assert keras.backend.backend() == "tensorflow", keras.backend.backend()
    classes = [case for case in suite.cases.values() if isinstance(case, type)]
    assert classes and all(issubclass(case, TestCase) for case in classes), classes
    bound = {name for name, value in vars(suite.module).items() if value is tfmp_class}
    assert suite.replaced and bound & _names_read(suite.code), (suite.replaced, bound)


def _names_read(code):
    """The global and attribute names `code` and the functions and classes in it read."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names_read(const)
    return names


def _mark_deselected(cases, deselect, path):
    classes = [case for case in cases.values() if isinstance(case, type)]
    for method, why in deselect.items():
        owners = [case for case in classes if method in vars(case)]
        if not owners:
            raise ValueError(f"deselected test {method!r} is not in {path}: drop it from the list")
        for case in owners:
            mark = pytest.mark.xfail(reason=f"tfmp on purpose: {why}", strict=True,
                                     raises=AssertionError)
            setattr(case, method, mark(vars(case)[method]))
