"""The blockwise arithmetic's threads (surgeon.quantized.on_threads / in_steps) when two threads
quantize at once, as a merge's reader (round trips of a quantized base) and writer (a quantized
output) do: torch's thread count is one setting for the whole process."""

from __future__ import annotations

import threading

import torch

from surgeon.quantized import STEP, in_steps, on_threads


def _step_threads() -> int:
    """How many threads in_steps spreads four steps over, here and now (each makes its own worker)."""
    made = []

    def make_worker():
        made.append(1)
        return lambda start, stop: None

    in_steps(4 * STEP, make_worker)
    return len(made)


def test_two_threads_inside_at_once_keep_their_grant_until_the_last_leaves():
    """The first thread in lowers torch to one thread, the last one out restores it; the one that
    leaves last keeps its step threads and torch's single thread after the other has left (it lost
    both: the first out restored torch's threads and emptied the grant under it)."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(2)
    first_left, inside = threading.Event(), threading.Barrier(2)
    seen = {}

    @on_threads
    def quantize(name: str, leaves_first: bool) -> None:
        inside.wait()
        if leaves_first:
            return
        first_left.wait()
        seen[name] = (torch.get_num_threads(), _step_threads())

    def run(name: str, leaves_first: bool) -> None:
        quantize(name, leaves_first)
        if leaves_first:
            first_left.set()

    try:
        workers = [threading.Thread(target=run, args=(name, name == "reader")) for name in ("reader", "writer")]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
        assert seen == {"writer": (1, 2)}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads_before)
