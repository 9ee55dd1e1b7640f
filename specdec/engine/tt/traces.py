"""Step programs captured once and replayed, kept apart from the model math.

A step program is a function of persistent device input buffers that returns device outputs.
Warm-up (at service start) compiles every program, then captures each one; a request only copies
its inputs into the same buffers and replays. The device calls go through a Runtime, so the order
of allocations, copies, captures and replays is tested without a chip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

StepProgram = Callable[[Mapping[str, Any]], Any]


class Runtime(Protocol):
    def allocate(self, host: Any) -> Any:
        """A device buffer shaped like `host`, holding its values."""

    def write(self, host: Any, device: Any) -> None:
        """Copies host values into an existing device buffer (same address: traces read it)."""

    def begin_capture(self) -> None: ...

    def end_capture(self) -> Any:
        """Returns the trace id."""

    def replay(self, trace: Any) -> None: ...

    def release(self, trace: Any) -> None: ...


@dataclass
class _Captured:
    program: StepProgram
    buffers: dict[str, Any]
    outputs: Any = None
    trace: Any = None


class StepTraces:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self._steps: dict[str, _Captured] = {}

    def warm_up(self, programs: Mapping[str, tuple[StepProgram, Mapping[str, Any]]]) -> None:
        """Compiles then captures each (program, example host inputs). Every program compiles
        before the first capture: a kernel compiled after a capture can overwrite the trace
        region (tt-metal #48536). Buffers are allocated here, never during a capture."""
        if self._steps:
            raise RuntimeError("step programs are captured once per device")
        for name, (program, host_inputs) in programs.items():
            buffers = {key: self.runtime.allocate(value) for key, value in host_inputs.items()}
            program(buffers)  # the compile run
            self._steps[name] = _Captured(program, buffers)
        for name, (_, host_inputs) in programs.items():
            step = self._steps[name]
            self._write(step, host_inputs)  # the compile run may have fed outputs back into inputs
            self.runtime.begin_capture()
            step.outputs = step.program(step.buffers)
            step.trace = self.runtime.end_capture()

    def run(self, name: str, host_inputs: Mapping[str, Any]) -> Any:
        """Copies the given inputs into the step's buffers and replays it; inputs left out keep
        what the last replay left there (a self-feeding draft writes its own next token)."""
        step = self._steps.get(name)
        if step is None:
            raise KeyError(f"step {name!r} was not captured at warm-up; captured: {', '.join(self._steps) or 'none'}")
        self._write(step, host_inputs)
        self.runtime.replay(step.trace)
        return step.outputs

    @property
    def captured(self) -> dict[str, Any]:
        """Each step's trace id."""
        return {name: step.trace for name, step in self._steps.items()}

    def close(self) -> None:
        for step in self._steps.values():
            if step.trace is not None:
                self.runtime.release(step.trace)
        self._steps.clear()

    def _write(self, step: _Captured, host_inputs: Mapping[str, Any]) -> None:
        unknown = set(host_inputs) - set(step.buffers)
        if unknown:
            raise KeyError(f"inputs {sorted(unknown)} are not buffers of this step ({sorted(step.buffers)})")
        for key, value in host_inputs.items():
            self.runtime.write(value, step.buffers[key])
