"""The Tenstorrent backend: our Llama forward in ttnn ops, one device per service process.

Every step is one decode-shaped pass over ROWS rows, captured once as a ttnn trace at start-up and
replayed: the draft runs it with one live row, the target's verify with k+1 live rows (rows past
k sit at position -1, so any k up to ROWS-1 replays the same trace). All sessions' KV lives in one
paged cache; a session owns blocks of it, and every live row of a step reads the same session's
page table, so row j attends to positions [0, P+j] of that one sequence.

Modules that need no chip (blocks, step_inputs, traces, device, weights, candidates) import no
ttnn at module level, so their logic is tested on any machine; model.py and engine.py run on a
device, and in tests on a numpy emulator of the ttnn ops they call (tests/ttnn_emulator.py).
"""
