"""Gemma 3 across two ranks (tensor and pipeline parallel) against one process: two real ranks
on 127.0.0.1 with MLX's ring backend, started here with MLX_RANK and MLX_HOSTFILE on free
ports (mlx.launch exits 0 even when a rank fails, so the ranks' own exit codes are read).
Every process is bounded in time and killed past it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from checkpoints import TEXT, VISION, write_tiny_checkpoint, write_weights
from distributed_worker import case_outputs, load_case

from gemma_mlx.distributed import RankOf, check_tensor_split, split_layers
from gemma_mlx.errors import BadSplit

WORKER = Path(__file__).with_name("distributed_worker.py")
SMALL = {**TEXT, "vocab_size": 512, "sliding_window": 8}  # 4 layers: sliding, global, ...


def vision_config(**text) -> dict:
    return dict(model_type="gemma3", text_config={**SMALL, **text}, vision_config=VISION,
                mm_tokens_per_image=4, image_token_index=500, boi_token_index=498,
                eoi_token_index=499)


# ---- starting ranks -------------------------------------------------------------------------

def hostfile(folder: Path, ranks: int = 2) -> Path:
    sockets = [socket.socket() for _ in range(ranks)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    path = folder / "hosts.json"
    path.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in ports]))
    return path


def start_ranks(command: list[str], folder: Path, ranks: range = range(2)) -> list:
    hosts = hostfile(folder)
    return [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hosts)})
            for rank in ranks]


def finish(processes: list, timeout: float) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each; all are killed at the deadline (a test failure)."""
    deadline = time.monotonic() + timeout
    results = []
    for p in processes:
        try:
            out, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in processes:
                q.kill()
            out, err = p.communicate()
            pytest.fail(f"a rank ran past {timeout} s: {err.decode()[-2000:]}")
        results.append((p.returncode, out.decode(), err.decode()))
    return results


def run_worker(cases: list[dict], folder: Path, timeout: float = 120) -> list[dict]:
    cases_file = folder / "cases.json"
    cases_file.write_text(json.dumps(cases))
    results = finish(start_ranks([sys.executable, str(WORKER), str(cases_file), str(folder)],
                                 folder), timeout)
    for rank, (code, _, err) in enumerate(results):
        assert code == 0, f"rank {rank}: {err[-3000:]}"
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(2)]


# ---- tiny random models: logits equal to one process ----------------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed_models")
    return {
        "text": write_weights(root / "text", SMALL, seed=1),
        "one_kv": write_weights(root / "one_kv", {**SMALL, "num_key_value_heads": 1}, seed=2),
        "three_heads": write_weights(root / "three_heads", {**SMALL, "num_attention_heads": 3,
                                                            "num_key_value_heads": 1}),
        "vision": write_weights(root / "vision", vision_config(), seed=3),
    }


CASES = [
    dict(name="tensor float32", model="text", mode="tensor"),
    dict(name="tensor 4-bit", model="text", mode="tensor", quantize=True),
    dict(name="tensor one KV head", model="one_kv", mode="tensor"),
    dict(name="tensor 8-bit KV cache", model="one_kv", mode="tensor", kv_bits=8),
    dict(name="tensor image", model="vision", mode="tensor", image=True),
    dict(name="pipeline float32 split 1:3", model="text", mode="pipeline", split=[1, 3]),
    dict(name="pipeline 4-bit split 3:1", model="text", mode="pipeline", quantize=True,
         split=[3, 1]),
    dict(name="pipeline one KV head, 4-bit KV cache", model="one_kv", mode="pipeline",
         kv_bits=4),
    dict(name="pipeline image", model="vision", mode="pipeline", image=True),
]


@pytest.fixture(scope="module")
def two_ranks(folders, tmp_path_factory):
    """Both ranks' results for every case (one pair of processes for all of them)."""
    out = tmp_path_factory.mktemp("distributed_logits")
    cases = [{**c, "folder": str(folders[c["model"]])} for c in CASES]
    cases.append(dict(name="three heads", folder=str(folders["three_heads"]), mode="tensor"))
    reports = run_worker(cases, out)
    arrays = [np.load(out / f"rank{rank}.npz") for rank in range(2)]
    return cases, reports, arrays


@pytest.mark.parametrize("name", [c["name"] for c in CASES])
def test_logits_and_greedy_tokens_equal_one_process(two_ranks, name):
    cases, reports, arrays = two_ranks
    case = next(c for c in cases if c["name"] == name)
    logits, tokens, _ = case_outputs(load_case(case, distributed=False), case)
    for rank in range(2):
        got = arrays[rank][name]
        assert got.shape == logits.shape
        assert np.abs(got - logits).max() < 1e-4, (rank, np.abs(got - logits).max())
        assert reports[rank][name]["tokens"] == tokens


def test_each_rank_reads_and_holds_only_its_part_a_block_at_a_time(two_ranks):
    """Pipeline ranks hold their layers; tensor ranks half of every linear layer (the norms and
    the embedding whole); the vision tower is on rank 0 only; a rank's memory peaks at its
    weights plus at most two blocks while loading, never at the whole model."""
    from gemma_mlx.loading import parameter_bytes

    cases, reports, _ = two_ranks
    case = {c["name"]: c for c in cases}
    net = load_case(case["tensor float32"], distributed=False).net
    whole, block = parameter_bytes(net), parameter_bytes(net.decoder.layers[0])
    linear = sum(parameter_bytes(getattr(part, name)) for b in net.decoder.layers
                 for part, names in ((b.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                     (b.mlp, ("gate_proj", "up_proj", "down_proj")))
                 for name in names)
    pipeline = [r["pipeline float32 split 1:3"] for r in reports]
    assert [p["layers"] for p in pipeline] == [[0], [1, 2, 3]]
    assert [p["weights"] for p in pipeline] == [whole - 3 * block, whole - block]
    for report in reports:
        assert report["tensor float32"]["weights"] == whole - linear // 2
        for name in ("tensor float32", "tensor one KV head", "pipeline float32 split 1:3"):
            assert report[name]["loaded_peak"] <= report[name]["weights"] + 2 * block
    assert [r[name]["vision"] for r in reports for name in ("tensor image", "pipeline image")] \
        == [True, True, False, False]


def test_tensor_parallel_decodes_with_the_compiled_step(two_ranks):
    """The compiled single-token step takes the sharded layers (pipelines step op by op)."""
    _, reports, _ = two_ranks
    for report in reports:
        assert report["tensor float32"]["compiled"] and report["tensor one KV head"]["compiled"]
        assert not report["pipeline float32 split 1:3"]["compiled"]


def test_ranks_that_do_not_divide_the_heads_are_refused_on_every_rank(two_ranks):
    _, reports, _ = two_ranks
    for report in reports:
        error = report["three heads"]["error"]
        assert error.startswith("BadSplit: tensor parallel splits the 3 attention heads")
        assert "2 ranks do not divide 3" in error and "--distributed pipeline" in error


# ---- rank 0 leads, rank 1 follows -----------------------------------------------------------

def test_a_chat_led_by_rank_0_equals_one_machine(tmp_path, folder_270m):
    """Images, follow-ups reusing the cache, undo, should_stop, a reader that stops reading,
    a JSON schema (rank 0's grammar), sampling and a quantized KV cache: rank 1 follows all of
    it."""
    folder = write_tiny_checkpoint(tmp_path / "chat", folder_270m, vision=True, seed=4)
    reports = run_worker([dict(kind="chat", folder=str(folder), mode="tensor")], tmp_path)
    assert reports[0]["distributed"] == reports[0]["one_machine"]
    assert len(reports[0]["distributed"]) == 7 and all(reports[0]["distributed"])
    assert reports[1]["followed"] == 8  # every generation: the cut-off one too


# ---- the real 270M ---------------------------------------------------------------------------

def test_270m_greedy_tokens_equal_one_process(model_270m, folder_270m, tmp_path):
    from gemma_mlx.engine import SamplingSettings, Stats, generate_tokens

    ids = model_270m.tokenizer.encode("The capital of France is")
    expected = list(generate_tokens(model_270m, ids, model_270m.make_cache(),
                                    SamplingSettings(temp=0.0, max_tokens=6), Stats()))
    reports = run_worker([dict(kind="greedy", folder=str(folder_270m), mode=mode, ids=ids)
                          for mode in ("tensor", "pipeline")], tmp_path)
    for report in reports:
        assert report == {"tensor": expected, "pipeline": expected}


def test_the_command_line_prints_on_rank_0_only(model_270m, tmp_path):
    import gemma_mlx

    prompt = "The capital of France is"
    expected = gemma_mlx.generate(model_270m, prompt, temp=0, max_tokens=4)
    ranks = start_ranks([sys.executable, "-m", "gemma_mlx", "--distributed", "pipeline", "-m",
                         "270m", prompt, "--temp", "0", "--max-tokens", "4"], tmp_path)
    (code0, out0, err0), (code1, out1, err1) = finish(ranks, timeout=120)
    assert (code0, code1) == (0, 0), err0 + err1
    assert out0 == expected + "\n"
    assert out1 == "" and err1 == ""  # the other rank prints nothing


def test_a_server_under_tensor_parallel_answers_the_openai_client(tmp_path, folder_270m):
    """`serve --distributed tensor` on two ranks: rank 0 serves HTTP, rank 1 follows each
    request; replies equal one machine's (a follow-up too), and Ctrl-C on rank 0 ends both."""
    import httpx
    import openai
    from servers import free_port

    import gemma_mlx

    folder = write_tiny_checkpoint(tmp_path / "served", folder_270m, vision=False, seed=5)
    chat = gemma_mlx.Chat(gemma_mlx.load(str(folder)), temp=0, max_tokens=5)
    expected = [chat.send("Hello there."), chat.send("And then?")]
    port = free_port()
    ranks = start_ranks([sys.executable, "-m", "gemma_mlx", "serve", "--distributed", "tensor",
                         "--model", str(folder), "--port", str(port)], tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert ranks[0].poll() is None, ranks[0].stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "rank 0 did not answer /health in time"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                               timeout=120)
        messages = [{"role": "user", "content": "Hello there."}]
        one = client.chat.completions.create(model=str(folder), messages=messages,
                                             temperature=0, max_tokens=5)
        messages += [{"role": "assistant", "content": one.choices[0].message.content},
                     {"role": "user", "content": "And then?"}]
        streamed = client.chat.completions.create(model=str(folder), messages=messages,
                                                  temperature=0, max_tokens=5, stream=True)
        two = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert [one.choices[0].message.content, two] == expected
    finally:
        ranks[0].send_signal(signal.SIGINT)
        (code0, _, err0), (code1, out1, err1) = finish(ranks, timeout=60)
    # rank 0 exits as the server does on Ctrl-C; rank 1 follows silently and ends with it
    assert (code0, code1) == (130, 0), err0[-2000:] + err1[-2000:]
    assert out1 == "" and err1 == ""


# ---- failures are clean and bounded ----------------------------------------------------------

@pytest.mark.parametrize("victim", [1, 0])
def test_a_rank_killed_mid_generation_stops_the_other_with_one_line(victim, folders, tmp_path):
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps([dict(kind="killed", folder=str(folders["text"]),
                                      mode="tensor")]))
    ranks = start_ranks([sys.executable, str(WORKER), str(cases), str(tmp_path)], tmp_path)
    assert ranks[0].stdout.readline() == b"generating\n", ranks[0].stderr.read().decode()
    killed = time.monotonic()
    ranks[victim].send_signal(signal.SIGKILL)
    code, _, err = finish([ranks[1 - victim]], timeout=30)[0]
    elapsed = time.monotonic() - killed
    ranks[victim].wait(timeout=10)
    assert code != 0
    assert elapsed < 15, elapsed  # the watchdog's grace is 3 s
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: a rank stopped"), err


def test_a_rank_whose_peers_never_join_stops_with_one_line(tmp_path):
    (rank0,) = start_ranks([sys.executable, "-m", "gemma_mlx", "--distributed", "tensor",
                            "-m", "270m", "Hi", "--join-timeout", "2"], tmp_path, range(1))
    started = time.monotonic()
    code, out, err = finish([rank0], timeout=40)[0]
    assert code != 0 and out == ""
    assert time.monotonic() - started < 30
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: the other ranks did not join within "
                                                   "2 s: start the same command on every host")


# ---- plans (no processes) --------------------------------------------------------------------

def test_pipeline_splits_evenly_or_by_ratio_and_need_not_follow_the_sliding_pattern():
    assert split_layers(18, 2) == [range(0, 9), range(9, 18)]
    assert split_layers(62, 3) == [range(0, 21), range(21, 42), range(42, 62)]
    assert split_layers(48, 2, [24, 8]) == [range(0, 36), range(36, 48)]  # 24 GB and 8 GB
    assert split_layers(4, 2, [1, 100]) == [range(0, 1), range(1, 4)]  # at least one layer
    with pytest.raises(BadSplit, match="one positive ratio per rank"):
        split_layers(18, 2, [1, 0])
    with pytest.raises(BadSplit, match="run on 4 ranks or fewer"):
        split_layers(4, 5)


def test_tensor_split_errors_name_what_divides():
    from gemma_mlx.config import TextConfig

    cfg = TextConfig(num_attention_heads=8, num_key_value_heads=4, intermediate_size=9216)
    check_tensor_split(cfg, 8)  # KV heads repeated twice
    with pytest.raises(BadSplit, match="run on 2 or 4 or 8 ranks"):
        check_tensor_split(cfg, 3)


def test_a_pipeline_rank_opens_only_the_shards_holding_its_layers(folders, tmp_path,
                                                                 monkeypatch):
    """A checkpoint in two files (mlx-lm's text layout and index): rank 0 of two reads only
    the first, which holds the embedding, the final norm and layers 0-1."""
    import mlx.core as mx

    from gemma_mlx import loading
    from gemma_mlx.distributed import Sharding

    weights = {k.replace("language_model.model.", "model."): v
               for k, v in mx.load(str(folders["text"] / "model.safetensors")).items()}
    first = {k: v for k, v in weights.items() if ".layers.2." not in k and ".layers.3." not in k}
    files = {"model-00001-of-00002.safetensors": first,
             "model-00002-of-00002.safetensors": {k: v for k, v in weights.items()
                                                  if k not in first}}
    for name, part in files.items():
        mx.save_safetensors(str(tmp_path / name), part)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, part in files.items() for k in part}}))
    (tmp_path / "config.json").write_text((folders["text"] / "config.json").read_text())
    opened, read = [], mx.load
    monkeypatch.setattr(mx, "load", lambda f: opened.append(Path(f).name) or read(f))

    def rank_of_two(rank: int):
        return lambda cfg: Sharding.plan("pipeline", cfg, RankOf(rank, 2))

    net, _ = loading.load_net(tmp_path, shard=rank_of_two(0))
    assert opened == ["model-00001-of-00002.safetensors"]
    assert [i for i, b in enumerate(net.decoder.layers) if b is not None] == [0, 1]
    opened.clear()
    loading.load_net(tmp_path, shard=rank_of_two(1))
    assert sorted(opened) == sorted(files)  # layers 2-3, the embedding and norm from the first
