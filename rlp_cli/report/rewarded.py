"""What RLP rewards: the highest- and lowest-rewarded thoughts of a run's samples.jsonl, early and late in training."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rlp_cli.report.records import Run, Sample, Thought


@dataclass
class Pick:
    label: str  # "highest reward", "lowest reward", or "every thought" when all got the same reward
    sample: Sample
    thought: Thought


@dataclass
class Phase:
    name: str  # "early" or "late"
    steps: list[int]  # the logged steps it covers
    n_thoughts: int  # rewarded thoughts among them
    picks: list[Pick] = field(default_factory=list)


def split_phases(samples: list[Sample]) -> list[tuple[str, list[Sample]]]:
    """The first and the last third of the logged steps (at least one each; the one step when only one was logged)."""
    if not samples:
        return []
    if len(samples) == 1:
        return [("early", samples)]
    k = math.ceil(len(samples) / 3)
    return [("early", samples[:k]), ("late", samples[-k:])]


def rewarded_thoughts(samples: list[Sample]) -> list[Phase]:
    """Per phase, the thought with the highest reward and the one with the lowest (the earliest on ties)."""
    phases = []
    for name, group in split_phases(samples):
        candidates = [(s, t) for s in group for t in s.thoughts if t.reward is not None]
        phase = Phase(name, [s.step for s in group], len(candidates))
        if candidates:
            top = max(candidates, key=lambda c: c[1].reward)
            bottom = min(candidates, key=lambda c: c[1].reward)
            if top[1].reward == bottom[1].reward:
                phase.picks.append(Pick("every thought", *top))
            else:
                phase.picks += [Pick("highest reward", *top), Pick("lowest reward", *bottom)]
        phases.append(phase)
    return phases


def runs_with_samples(runs: list[Run], arms: list[str]) -> list[Run]:
    """The training runs that logged samples, in the table's order of arms."""
    order = {a: i for i, a in enumerate(arms)}
    runs = [r for r in runs if r.kind == "run" and r.samples]
    return sorted(runs, key=lambda r: (order.get(r.arm, len(order)), str(r.seed), r.folder))
