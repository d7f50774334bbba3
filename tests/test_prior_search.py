"""Replaying the greedy walk over scored grid plans: a prior that knows the layers' true weights reaches the
exhaustive frontier with the smallest walk; one that ranks them backwards needs more or never does."""

from ds_study import prior_search
from ds_study.frontier import candidate_groups


def additive(weights):
    """Quality of recomputing a group = the weights it covers (full reuse 0): what one group can recover."""
    return {(): 0.0, **{((a, b),): float(sum(weights[a:b + 1])) for a, b in candidate_groups(len(weights), 1)}}


def test_true_prior_reaches_the_frontier_with_the_smallest_walk():
    w = [0, 0, 1, 5, 9, 4, 0, 0]
    scores = additive(w)
    good = prior_search.evaluations_to_frontier(scores, 8, 1, w, tolerance=0.0)
    assert good["evaluations"] == 9  # full reuse, full prefill, one plan per recompute count
    assert good["max_gap_at_quarter"] == 0
    bad = prior_search.evaluations_to_frontier(scores, 8, 1, [-x for x in w], tolerance=0.0)
    assert bad["evaluations"] is None or bad["evaluations"] > good["evaluations"]
    assert bad["mean_gap_at_quarter"] >= good["mean_gap_at_quarter"]
