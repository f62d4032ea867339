"""What the benchmarks here share: the ``--smoke`` flag, the ratio line (our figure over the
baseline measured in the same run) and the exit status (1 when a target is missed).

A smoke run goes through the whole benchmark on inputs too small for its figures to mean
anything, so that CI notices a broken benchmark in seconds; it prints the same lines and
says that its targets were not enforced.
"""

from __future__ import annotations

import argparse

__all__ = ["Verdict", "add_smoke"]


def add_smoke(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true",
                        help="seconds, on tiny inputs: the whole code path for CI; targets reported, "
                             "not enforced")


class Verdict:
    """Collects a benchmark's targets as it prints them; ``exit_status()`` ends the run."""

    def __init__(self, smoke: bool = False) -> None:
        self.smoke = smoke
        self.missed: list[str] = []

    def ratio(self, name: str, ours: float, baseline: float, *, at_least: float | None = None,
              at_most: float | None = None) -> float:
        """Print ``ratio NAME: R`` (ours / baseline) and, with a bound, whether it is met."""
        value = ours / baseline if baseline else float("nan")
        bound = (f">= {at_least:.2f}" if at_least is not None else "") + \
                (f"<= {at_most:.2f}" if at_most is not None else "")
        ok = (at_least is None or value >= at_least) and (at_most is None or value <= at_most)
        print(f"ratio {name}: {value:.3f}" + (f" (target {bound}: {self._word(ok)})" if bound else ""),
              flush=True)
        if bound:
            self._record(f"{name} {value:.3f}, target {bound}", ok)
        return value

    def target(self, text: str, ok: bool) -> None:
        """A target that is not a ratio (an absolute rate, a latency)."""
        print(f"target {text}: {self._word(ok)}", flush=True)
        self._record(text, ok)

    def exit_status(self) -> int:
        if self.smoke:
            print("smoke run: the figures above come from tiny inputs; targets not enforced", flush=True)
            return 0
        print("targets: " + ("all met" if not self.missed else "MISSED: " + "; ".join(self.missed)), flush=True)
        return 1 if self.missed else 0

    def _record(self, text: str, ok: bool) -> None:
        if not ok:
            self.missed.append(text)

    def _word(self, ok: bool) -> str:
        return "met" if ok else "missed"
