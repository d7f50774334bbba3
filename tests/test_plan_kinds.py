"""A new plan kind (a baseline) is one PlanKind subclass and one registry line: once registered, the
plan parser, the batch-1 executor, the batched evaluator and the Evaluator's cells all run it."""

import pytest
from tiny_pair import fixture_examples

from ds_study import batched, data, runner
from ds_study.executor import capture
from ds_study.plans import Plan, PlanError, PlanKind, parse_plan, plan_kinds, register_plan_kind, unregister_plan_kind


class Interpolate(PlanKind):
    """Every layer's K/V a mix of the receiver's own and the sender's: (1 - w) own + w sender."""

    name = "interpolate"
    syntax = ("'interpolate@W'",)

    def parse(self, spec, n_layers, cacheblend_ratio):
        if not spec.startswith("interpolate@"):
            return None
        return Plan("interpolate", params=(("w", float(spec.split("@", 1)[1])),), _n_layers=n_layers)

    def label(self, plan):
        return f"interpolate@{plan.param('w'):g}"

    def recomputed_layers(self, plan):
        return list(range(plan._n_layers))

    def prefill(self, model, plan, token_ids, sender, memo=None):
        own, w = capture(model, token_ids, with_embeds=False), plan.param("w")
        return [((1 - w) * k + w * sk.to(k), (1 - w) * v + w * sv.to(v))
                for k, v, sk, sv in zip(own.keys, own.values, sender.keys, sender.values)]


@pytest.fixture
def registered():
    register_plan_kind("interpolate", Interpolate)  # the one registry line
    yield
    unregister_plan_kind("interpolate")


@pytest.fixture(scope="module")
def setup():
    return fixture_examples(3)


def test_unknown_plan_lists_every_registered_syntax(registered):
    with pytest.raises(PlanError, match="interpolate@W"):
        parse_plan("interpolated", 8)
    assert [k.name for k in plan_kinds()][-1] == "interpolate"
    plan = parse_plan("interpolate@0.25", 8)
    assert (plan.name, plan.needs_sender, plan.recompute_count) == ("interpolate@0.25", True, None)


def test_registered_kind_runs_everywhere(setup, registered):
    pair, task, examples = setup
    tok = pair.tokenizer
    plans = runner.plans_of(["full_prefill", "full_reuse", "interpolate@0", "interpolate@1", "interpolate@0.5"],
                            pair.n_layers)
    ev = runner.Evaluator(pair, task, batch_size=3)
    items = [batched.Item(ex.prompt.prefix_ids, ex.prompt.suffix_ids,
                          data.answer_ids(tok, task, ex.record["answers"][0])) for ex in examples]
    got = batched.evaluate_plans(pair.receiver, pair.sender, items, plans, tok.pad_token_id, task.max_new_tokens,
                                 {tok.eos_token_id}, stop=ev.stop)
    for k, ex in enumerate(examples):
        # its two ends are the two baselines it interpolates between
        assert got["interpolate@0"][k]["tokens"] == got["full_prefill"][k]["tokens"]
        assert got["interpolate@1"][k]["tokens"] == got["full_reuse"][k]["tokens"]
        assert got["interpolate@1"][k]["nll"] == pytest.approx(got["full_reuse"][k]["nll"], abs=1e-5)
        # the batch-1 executor agrees with the batched evaluator
        assert ev.run(plans[-1], ex).token_ids == got["interpolate@0.5"][k]["tokens"]
    assert any(r["kl"] > 1e-4 for r in got["interpolate@0.5"])
    # cells: the Evaluator computes and stores them like any baseline's
    ev.compute(plans[-1:], examples)
    rows = [ev._get("interpolate@0.5", ex.id) for ex in examples]
    assert [r["prediction"] for r in rows] == [runner.prediction_text(tok, g["tokens"]) for g in got["interpolate@0.5"]]
    assert all(r["n_recomputed"] is None for r in rows)
