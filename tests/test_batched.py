"""Batched baselines agree with the batch-1 executor, and the continuous signals mean what they say."""

import pytest
import torch

from ds_study import batched, data, runner
from ds_study.deviation import rel_l2
from ds_study.plans import parse_plan
from tiny_pair import fixture_examples


@pytest.fixture(scope="module")
def setup():
    pair, task, examples = fixture_examples(4)
    # different context and suffix lengths, so the padding paths are exercised
    items = [batched.Item(ex.prompt.prefix_ids[: 200 + 37 * k], ex.prompt.suffix_ids,
                          data.answer_ids(pair.tokenizer, task, ex.record["answers"][0])) for k, ex in enumerate(examples)]
    return pair, task, items


def test_batched_baselines_match_batch_one(setup):
    pair, task, items = setup
    tok = pair.tokenizer
    ev = runner.Evaluator(pair, task)
    got = batched.evaluate_baselines(pair.receiver, pair.sender, items, tok.pad_token_id, task.max_new_tokens, {tok.eos_token_id},
                                     stop=ev.stop)
    for k, it in enumerate(items):
        ex = runner.Example({"_id": f"x{k}", "answers": ["a"]}, data.Prompt(it.prefix, it.suffix, "", "", False))
        for plan in batched.BASELINES:
            one = ev.run(parse_plan(plan, pair.n_layers), ex)
            assert got[plan][k]["tokens"] == one.token_ids, (plan, k)
    # alone in a batch, the same numbers
    solo = batched.evaluate_baselines(pair.receiver, pair.sender, items[2:3], tok.pad_token_id, task.max_new_tokens, {tok.eos_token_id},
                                      stop=ev.stop)
    for plan in batched.BASELINES:
        assert solo[plan][0]["tokens"] == got[plan][2]["tokens"]
        assert solo[plan][0]["nll"] == pytest.approx(got[plan][2]["nll"], rel=1e-4, abs=1e-5)
        assert solo[plan][0]["kl"] == pytest.approx(got[plan][2]["kl"], rel=1e-3, abs=1e-6)


def test_signals(setup):
    pair, task, items = setup
    tok = pair.tokenizer
    got = batched.evaluate_baselines(pair.receiver, pair.sender, items, tok.pad_token_id, 4, {tok.eos_token_id})
    assert all(r["kl"] < 1e-6 for r in got["full_prefill"])  # the reference against itself
    assert all(r["kl"] > 1e-4 for r in got["full_reuse"])  # another model's KV moves the distribution
    # teacher-forced NLL by hand for one row: full prefill of prompt + answer
    it = items[1]
    ids = torch.tensor([it.prefix + it.suffix + it.answer])
    with torch.no_grad():
        logp = torch.log_softmax(pair.receiver(ids).logits[0].float(), -1)
    n = len(it.prefix) + len(it.suffix)
    want = -float(sum(logp[n - 1 + j, t] for j, t in enumerate(it.answer)) / len(it.answer))
    assert got["full_prefill"][1]["nll"] == pytest.approx(want, rel=1e-4)


PLANS = ["full_prefill", "full_reuse", "sender", "0-1", "2-5", "2-3,6-7", "3-7", "reuse_only:4", "cacheblend@0.3"]


def test_every_plan_kind_matches_batch_one(setup):
    """Recompute groups (from the sender's E), single-layer reuse, CacheBlend and the sender, batched with
    contexts of different lengths, decode what the batch-1 executor decodes, with the same output error."""
    pair, task, items = setup
    tok = pair.tokenizer
    ev = runner.Evaluator(pair, task, keep=len(items))
    got = batched.evaluate_plans(pair.receiver, pair.sender, items, PLANS, tok.pad_token_id, task.max_new_tokens,
                                 {tok.eos_token_id}, stop=ev.stop, out_err=True)
    for k, it in enumerate(items):
        ex = runner.Example({"_id": f"x{k}", "answers": ["a"]}, data.Prompt(it.prefix, it.suffix, "", "", False))
        for spec in PLANS:
            plan = parse_plan(spec, pair.n_layers)
            one = ev.run(plan, ex)
            assert got[plan.name][k]["tokens"] == one.token_ids, (spec, k)
            want = rel_l2(one.suffix_hidden, ev.reference_hidden(ex))
            assert got[plan.name][k]["out_err"] == pytest.approx(want, rel=1e-3, abs=1e-5), (spec, k)
    assert all(r["out_err"] == 0 for r in got["full_prefill"])


def test_evaluator_cells_carry_signals_and_resume(setup, tmp_path):
    """Cells computed in batches hold the task score and both continuous signals; a second evaluator on
    the same store computes nothing."""
    pair, task, _ = setup
    examples = runner.prepare(pair, task, data.load_records("pycode", "profile", limit=5), 1024)
    plans = [parse_plan(p, pair.n_layers) for p in ("full_prefill", "full_reuse", "2-5")]
    store = runner.CellStore(tmp_path, pair, task, "profile", 1024)
    ev = runner.Evaluator(pair, task, store, batch_size=2)
    ev.fill(plans, examples)
    assert ev.n_run == 15
    rows = [store.get(p.name, ex.id) for p in plans for ex in examples]
    assert all({"score", "nll", "kl", "batch"} <= set(r) for r in rows)
    again = runner.Evaluator(pair, task, runner.CellStore(tmp_path, pair, task, "profile", 1024), batch_size=4)
    again.fill(plans, examples)
    assert again.n_run == 0 and again.cell(plans[2], examples[0]) == store.get(plans[2].name, examples[0].id)


def test_an_interrupted_batch_keeps_the_plans_it_finished(setup, tmp_path, monkeypatch):
    pair, task, _ = setup
    examples = runner.prepare(pair, task, data.load_records("pycode", "profile", limit=3), 1024)
    plans = [parse_plan(p, pair.n_layers) for p in ("full_prefill", "0-1", "2-5")]
    store = runner.CellStore(tmp_path, pair, task, "profile", 1024)
    real = batched.evaluate_plans

    def interrupted(*args, on_plan=None, **kwargs):
        seen = []

        def hook(plan, rows):
            on_plan(plan, rows)
            seen.append(plan)
            if len(seen) == 2:
                raise KeyboardInterrupt
        return real(*args, on_plan=hook, **kwargs)

    monkeypatch.setattr(runner.batched, "evaluate_plans", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.Evaluator(pair, task, store, batch_size=3).fill(plans, examples)
    kept = runner.CellStore(tmp_path, pair, task, "profile", 1024)
    assert sum(kept.get(p.name, ex.id) is not None for p in plans for ex in examples) == 6  # two plans x 3


def test_a_later_call_on_the_same_batch_captures_nothing_again(setup, tmp_path, monkeypatch):
    """A greedy step scores two plans on the profiling batch: the Evaluator keeps the batch's captures
    and reference pass, so the next step runs only its plans, and computes what a fresh batch computes."""
    pair, task, _ = setup
    examples = runner.prepare(pair, task, data.load_records("pycode", "profile", limit=3), 1024)
    steps = [[parse_plan(p, pair.n_layers) for p in step] for step in (("0-1", "2-5"), ("2-3", "3-7"), ("sender",))]
    fresh = runner.Evaluator(pair, task, runner.CellStore(tmp_path / "a", pair, task, "profile", 1024), batch_size=3)
    fresh.compute([p for step in steps for p in step], examples)
    captures = []
    real = batched.capture
    monkeypatch.setattr(batched, "capture", lambda *a, **k: captures.append(1) or real(*a, **k))
    store = runner.CellStore(tmp_path / "b", pair, task, "profile", 1024)
    ev = runner.Evaluator(pair, task, store, batch_size=3)
    for step in steps:
        ev.compute(step, examples)
    assert len(captures) == 2  # the receiver's and the sender's, once
    for p in (p for step in steps for p in step):
        for ex in examples:
            a, b = fresh._get(p.name, ex.id), store.get(p.name, ex.id)
            assert (a["prediction"], a["nll"], a["kl"]) == (b["prediction"], b["nll"], b["kl"]), (p.name, ex.id)
