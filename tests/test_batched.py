"""Batched baselines agree with the batch-1 executor, and the continuous signals mean what they say."""

import pytest
import torch

from ds_study import batched, data, runner
from ds_study.executor import parse_plan
from ds_study.pair import load_pair


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    pair = load_pair("zoo:code", "zoo:qa")
    task = data.TASKS["pycode"]
    examples = runner.prepare(pair, task, data.load_records("pycode", "profile", limit=4), 1024)
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
