"""Which layer made which op: the layer calls of a trace, recorded as they happen.

`CallRecorder.recording(model)` wraps every layer's `call` (on the instance, for as
long as it is open); each call notes the span of graph ops it made, so an op can be
credited to the innermost call that was open when it was made. TensorFlow-only (the
graph). `tfmp.rewrite.tracing` and `tfmp.rewrite.overflows` read traces through it.
"""

from __future__ import annotations

from typing import Any

import keras

from tfmp import _compat


def _owners(calls: list[tuple[Any, Any, int, int, int]]) -> dict[int, list[tuple[Any, Any]]]:
    """Each layer's own ops: an op belongs to the innermost call that was open when it was made.

    `calls`: `(layer, graph, first op, end op, order the call began in)`.
    """
    owned: dict[int, list[tuple[Any, Any]]] = {}
    by_graph: dict[int, list[tuple[Any, Any, int, int, int]]] = {}
    for call in calls:
        by_graph.setdefault(id(call[1]), []).append(call)
    for graph_calls in by_graph.values():
        graph = graph_calls[0][1]
        operations = graph.get_operations()
        # Outer calls first: by first op, then the longer span, then the earlier start (a
        # call that only wraps another one spans the same ops).
        spans = sorted(graph_calls, key=lambda c: (c[2], -c[3], c[4]))
        stack: list[tuple[Any, Any, int, int, int]] = []  # the open calls, innermost last
        nxt = 0
        for i, operation in enumerate(operations):
            while nxt < len(spans) and spans[nxt][2] <= i:  # calls nest: outer ones first
                stack.append(spans[nxt])
                nxt += 1
            while stack and stack[-1][3] <= i:
                stack.pop()
            if stack:
                owned.setdefault(id(stack[-1][0]), []).append((operation, stack[-1][0]))
    return owned



class CallRecorder:
    """Records every layer call made while `recording(model)` is open (in a trace).

    Attributes:
        calls: `(layer, graph, first op, end op, order the call began in)` per call.
        order: The layers in the order their first call began.
        results: Each layer's outputs, one entry per call, by `id(layer)`.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any, int, int, int]] = []
        self.order: list[Any] = []
        self.results: dict[int, list[Any]] = {}
        self._began = 0

    def reset(self) -> None:
        """Forgets what was recorded (a new trace)."""
        self.calls, self.order, self.results, self._began = [], [], {}, 0

    def _wrap(self, layer: Any, call: Any) -> Any:
        def traced_call(*args: Any, **kwargs: Any) -> Any:
            graph = _compat.current_graph()
            start, began = len(graph.get_operations()), self._began
            self._began += 1
            if layer not in self.order:
                self.order.append(layer)
            result = call(*args, **kwargs)
            self.calls.append((layer, graph, start, len(graph.get_operations()), began))
            self.results.setdefault(id(layer), []).append(result)
            return result

        return traced_call

    def recording(self, model: keras.Model) -> Any:
        """A context in which every layer of `model` (and `model`) records its calls."""
        layers = _compat.flatten_layers(model, include_self=True, recursive=True)
        return _compat.calls_wrapped(layers, self._wrap)

    def owned_ops(self) -> dict[int, list[tuple[Any, Any]]]:
        """Each layer's own ops (not its sublayers'), by `id(layer)`: `(op, layer)` pairs."""
        return _owners(self.calls)
