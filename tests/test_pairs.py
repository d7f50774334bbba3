"""The pair table's rows come through the one config -> Evaluator path, and a rerun computes nothing."""

from ds_study import pairs


def test_pair_row_and_resume(tmp_path):
    row = pairs.evaluate_pair("tiny", "profile", 2, 2, str(tmp_path))
    assert row["n"] == 2 and row["pair"] == "tiny"
    m, lo, hi = row["reuse_minus_receiver"]
    assert lo <= m <= hi
    cells = list(tmp_path.glob("tiny/*.jsonl"))
    before = cells[0].read_text()
    assert len(before.splitlines()) == 6  # three baselines x two examples
    again = pairs.evaluate_pair("tiny", "profile", 2, 2, str(tmp_path))
    assert cells[0].read_text() == before and again["receiver_score"] == row["receiver_score"]
    assert "| tiny |" in pairs.table([row])
