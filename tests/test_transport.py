"""Sender and receiver as two real processes over torch.distributed (gloo, loopback only).

Every process runs under a hard timeout and is killed in ``finally``: these tests can fail, never hang.
"""

import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from ds_study.link import Link
from ds_study.serving import Item
from ds_study.executor import capture, decode, partial_prefill
from ds_study.plans import parse_plan
from ds_study.transport import LiveCapture, free_port
from test_executor import prompt, tiny_model

torch.set_num_threads(1)
HARD_TIMEOUT = 180


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    paths = {}
    for name, seed in (("receiver", 0), ("sender", 1)):
        tiny_model("llama", seed).save_pretrained(root / name)
        paths[name] = str(root / name)
    prefix, suffix = prompt(n_prefix=48, seed=11)
    (root / "prompt.json").write_text(json.dumps({"prefix_ids": prefix, "suffix_ids": suffix}))
    return paths, str(root / "prompt.json"), prefix, suffix


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _env(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", DS_STUDY_CACHE=str(tmp_path),
               PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    return env


def _run_pair(tmp_path, models, receiver_args, sender_args, on_sender_line=None):
    paths, prompt_file, _, _ = models
    port = free_port()
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "ds_study.transport"]
    sender = subprocess.Popen(cmd + ["sender", "--model", paths["sender"], "--port", str(port), "--timeout", "20"]
                              + sender_args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=_env(tmp_path))
    receiver = subprocess.Popen(cmd + ["receiver", "--model", paths["receiver"], "--port", str(port),
                                       "--timeout", "20", "--prompt", prompt_file, "--out", str(out)]
                                + receiver_args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=_env(tmp_path))
    killer = threading.Timer(HARD_TIMEOUT, lambda: (sender.kill(), receiver.kill()))
    killer.start()
    sender_log = []
    try:
        for line in sender.stdout:
            sender_log.append(line)
            if on_sender_line is not None and on_sender_line(line, sender):
                break
        receiver_log = receiver.communicate(timeout=HARD_TIMEOUT)[0]
        sender.wait(timeout=HARD_TIMEOUT)
    finally:
        killer.cancel()
        for p in (sender, receiver):
            if p.poll() is None:
                p.kill()
    assert receiver.returncode == 0, receiver_log
    assert out.exists(), receiver_log
    return json.loads(out.read_text()), "".join(sender_log)


def _reference(models, plan):
    paths, _, prefix, suffix = models
    receiver, sender = _load(paths["receiver"]), _load(paths["sender"])
    sc = capture(sender, prefix) if plan != "full_prefill" else None
    return decode(receiver, partial_prefill(receiver, parse_plan(plan, 4), prefix, sc), suffix, 8).token_ids


def test_live_capture_matches_capture():
    model = tiny_model("llama", 1)
    prefix, _ = prompt(n_prefix=30, seed=3)
    ref = capture(model, prefix)
    live = LiveCapture(model, prefix)
    assert torch.equal(live.tensors(Item(2, "e"))[0], ref.embeds[2])  # E first, before layer 0's KV
    k, v = live.tensors(Item(0, "kv"))
    assert torch.equal(k, ref.keys[0]) and torch.equal(v, ref.values[0])
    assert torch.equal(live.tensors(Item(3, "kv"))[1], ref.values[3])


def test_two_process_pipelined_transfer(tmp_path, models):
    res, sender_log = _run_pair(tmp_path, models,
                                ["--plan", "2-3", "--strategy", "pipelined", "--max-new-tokens", "8"],
                                ["--gbps", "0.01", "--chunk-bytes", "1024"])
    assert res["fallback"] is None, res
    assert res["token_ids"] == _reference(models, "2-3")
    assert [line.split()[1] for line in sender_log.splitlines() if line.startswith("SENT")] == ["E2", "KV0", "KV1"]
    loads = [s for s in res["spans"] if s["op"] == "load"]
    assert [(s["layer"], s["kind"]) for s in loads] == [(2, "e"), (0, "kv"), (1, "kv")]
    assert res["bytes_loaded"] > 0 and res["receiver"].startswith(models[0]["receiver"])


def test_killed_sender_mid_transfer_falls_back_to_full_prefill(tmp_path, models):
    def kill_after_first_item(line, sender):
        if line.startswith("SENT"):
            sender.kill()  # SIGKILL mid-transfer: the remaining items never come
            return True
        return False

    # Slow link: each item takes a good fraction of a second, so the kill lands mid-transfer.
    res, sender_log = _run_pair(tmp_path, models,
                                ["--plan", "3-3", "--strategy", "pipelined", "--max-new-tokens", "8"],
                                ["--gbps", "0.0001", "--chunk-bytes", "256"], on_sender_line=kill_after_first_item)
    assert "SENT" in sender_log
    assert res["fallback"] == "full_prefill", res
    assert "failed" in res["reason"] or "timed out" in res["reason"]
    assert any(s["op"] == "fallback" for s in res["spans"])
    assert res["token_ids"] == _reference(models, "full_prefill")


def test_link_chunking_is_shared_by_both_sides():
    # The receiver recomputes the sender's chunking from the header; both use the same byte ranges.
    link = Link(chunk_bytes=1000)
    assert [hi - lo for lo, hi in link.chunks(2500)] == [1000, 1000, 500]
