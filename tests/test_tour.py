"""docs/tour.md is executed: every `>>>` example must print exactly what the page shows."""

import doctest
from pathlib import Path

import numpy as np

TOUR = Path(__file__).resolve().parent.parent / "docs" / "tour.md"


def test_the_tour_runs_as_written():
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    with np.printoptions():                      # the tour sets its own print options; restore them after
        result = doctest.testfile(str(TOUR), module_relative=False, optionflags=flags, raise_on_error=False,
                                  verbose=False)
    assert result.attempted > 40
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in docs/tour.md"


def test_the_tour_covers_its_topics():
    text = TOUR.read_text()
    for topic in ("Dense attention", "Causal", "sliding window", "Global tokens", "BigBird", "online softmax",
                  "tiled kernel", "backward from the log-sum-exp", "Checkpointing"):
        assert topic.lower() in text.lower(), topic
    fences = [line.strip() for line in text.splitlines() if line.strip().startswith("```")]
    assert len(fences) % 2 == 0 and all(f == "```pycon" for f in fences[0::2])
