"""Widgets wired by name: ``Widgets`` (a name per widget or list of widgets) and ``by_name`` (an event
whose handler takes its inputs as keyword arguments and returns its outputs as a dict by name)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import gradio as gr


def _flat(widget) -> list:
    return [w for item in widget for w in _flat(item)] if isinstance(widget, list) else [widget]


class Widgets(dict):
    """Widgets by name; a name may stand for a list of widgets (one per concept row; a row's four box
    numbers), whose values then travel as a list."""

    def components(self) -> list:
        return _flat(list(self.values()))

    def read(self, values: Mapping) -> dict[str, Any]:
        """gradio's {component: value} (an event whose inputs are a set) as keyword arguments by name."""

        def value(widget):
            return [value(w) for w in widget] if isinstance(widget, list) else values[widget]

        return {name: value(widget) for name, widget in self.items()}

    def updates(self, named: Mapping[str, Any]):
        """A handler's {name: value} as gradio's {component: value}; a widget left out stays as it is."""
        out = {}

        def put(widget, value) -> None:
            if isinstance(widget, list):
                for w, v in zip(widget, value, strict=True):
                    put(w, v)
            else:
                out[widget] = value

        for name, value in named.items():
            put(self[name], value)
        return out or gr.skip()


def by_name(fn, inputs: Widgets, outputs: Widgets | gr.components.Component) -> dict:
    """The ``fn``, ``inputs`` and ``outputs`` of an event that calls ``fn`` with ``inputs`` as keyword
    arguments; ``fn`` returns (or yields) the values of ``outputs`` by name (or the value of one widget)."""
    convert = outputs.updates if isinstance(outputs, Widgets) else (lambda value: value)
    if inspect.isgeneratorfunction(fn):

        def run(values):
            for value in fn(**inputs.read(values)):
                yield convert(value)
    else:

        def run(values):
            return convert(fn(**inputs.read(values)))

    run.__name__ = getattr(fn, "__name__", "run")
    listed = outputs.components() if isinstance(outputs, Widgets) else outputs
    return {"fn": run, "inputs": set(inputs.components()), "outputs": listed}
