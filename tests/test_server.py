"""Reliability of the served product over HTTP: real ``vllm serve`` processes, the official
``openai`` client, vLLM's ``/metrics`` and csr-vllm's ``/csr/stats``.

One CSR server (csr-2b, default dictionary) with a KV pool of a few blocks serves the module:
overload (more concurrent requests than fit), cancellation and disconnects, bad requests, the
API key, the metrics. Each server starts once (~40 s here).
"""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request

import pytest

from csr_vllm.server.launch import ServerProcess, get_json
from csr_vllm.server.metrics import GAUGES

pytestmark = pytest.mark.slow

KEY = "test-key"
BLOCKS = 8  # x 128 tokens: far fewer than the overload test asks for at once
MAX_LEN = 512
MAX_TOKENS = 24


def metrics_text(base: str) -> str:
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        return r.read().decode()


def families(base: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(metrics_text(base))}


def sample(fams: dict, name: str, suffix: str = "") -> float:
    """Sum of a family's samples named ``name + suffix`` (vLLM labels per engine)."""
    return sum(s.value for s in fams[name].samples if s.name == name + suffix)


@pytest.fixture(scope="module")
def server(model_dir, default_dict):
    flags = ["--kv-cache-backend", "csr", "--csr-dict", default_dict, "--csr-preset", "csr-2b",
             "--max-model-len", str(MAX_LEN), "--num-gpu-blocks-override", str(BLOCKS),
             "--max-num-seqs", "16", "--api-key", KEY, "--served-model-name", "smollm2",
             "--enforce-eager"]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "CSR_VLLM_METRICS_INTERVAL_S": "0.5",
           "TOKENIZERS_PARALLELISM": "false"}
    with ServerProcess(str(model_dir), flags, env) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    """A factory: each ``asyncio.run`` needs its own client (httpx binds to one event loop)."""
    from openai import AsyncOpenAI

    return lambda: AsyncOpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0,
                               timeout=600)


@pytest.fixture(scope="module")
def passages(tokenizer, eval_text):
    """Held-out passages of ~115 tokens: one 128-token block for the prompt, a second one
    during decoding, so 12 at once need three times the pool and running requests get
    preempted when they cross the block boundary."""
    ids = tokenizer(eval_text[:60000])["input_ids"]
    return [tokenizer.decode(ids[i * 400:i * 400 + 115]) for i in range(12)]


def run(coro):
    return asyncio.run(coro)


async def complete(client, prompt: str) -> str:
    if callable(client):
        client = client()
    r = await client.completions.create(model="smollm2", prompt=prompt, max_tokens=MAX_TOKENS,
                                        temperature=0)
    assert r.choices[0].finish_reason == "length"
    return r.choices[0].text


def test_stats_report_the_pool_and_require_the_api_key(server):
    with pytest.raises(urllib.error.HTTPError) as e:
        get_json(server.base + "/csr/stats")
    assert e.value.code == 401
    st = get_json(server.base + "/csr/stats", KEY)
    assert st["active"] and st["preset"] == "csr-2b" and st["bits_per_channel"] == 2.0
    assert st["kv_capacity_tokens"] == BLOCKS * 128
    assert st["compression_ratio"] == pytest.approx(8.0)
    assert st["dense_equivalent_capacity_tokens"] == BLOCKS * 128 // 8
    assert st["dictionaries"][0]["sha256"] and st["side_bytes"]["dictionaries"] > 0
    # vLLM's own figure for the same pool agrees.
    info = families(server.base)["vllm:cache_config_info"].samples[0].labels
    assert int(info["num_gpu_blocks"]) == BLOCKS


def test_overload_completes_every_request_as_run_alone(server, client, passages):
    import httpx

    async def one_at_a_time():
        c = client()
        return [await complete(c, p) for p in passages]

    serial = run(one_at_a_time())
    before = families(server.base)
    waiting: list[float] = []

    async def burst():
        async def watch(done: asyncio.Event) -> None:
            async with httpx.AsyncClient() as http:
                while not done.is_set():
                    text = (await http.get(server.base + "/metrics")).text
                    waiting.extend(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                                   if ln.startswith("vllm:num_requests_waiting{"))
                    await asyncio.sleep(0.2)

        done = asyncio.Event()
        watcher = asyncio.create_task(watch(done))
        c = client()
        outs = await asyncio.gather(*(complete(c, p) for p in passages))
        done.set()
        await watcher
        return outs

    together = run(burst())
    after = families(server.base)
    assert together == serial
    # The burst really overloaded the pool: requests queued and running ones were preempted.
    assert max(waiting) > 0
    assert sample(after, "vllm:num_preemptions", "_total") > \
        sample(before, "vllm:num_preemptions", "_total")
    assert sample(after, "vllm:request_success", "_total") - \
        sample(before, "vllm:request_success", "_total") == len(passages)


def test_over_long_prompt_gets_a_400(client):
    import openai

    with pytest.raises(openai.BadRequestError):
        run(client().completions.create(model="smollm2", prompt="word " * (MAX_LEN + 50),
                                        max_tokens=8))


def test_cancel_and_disconnect_leave_no_blocks(server, client, passages):
    import httpx

    async def cancel_after(prompt: str, chunks: int) -> int:
        stream = await client().completions.create(model="smollm2", prompt=prompt,
                                                 max_tokens=200, temperature=0, stream=True)
        n = 0
        async for _ in stream:
            n += 1
            if n >= chunks:
                break
        await stream.close()
        return n

    async def disconnect(prompt: str) -> None:
        body = {"model": "smollm2", "prompt": prompt, "max_tokens": 200, "stream": True}
        async with httpx.AsyncClient(timeout=600) as http, http.stream(
                "POST", server.base + "/v1/completions", json=body,
                headers={"Authorization": f"Bearer {KEY}"}) as r:
            async for _ in r.aiter_lines():
                break  # drop the connection after the first event

    async def scenario():
        await asyncio.gather(*(cancel_after(p, 3) for p in passages[:4]),
                             *(disconnect(p) for p in passages[4:8]))

    run(scenario())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        fams = families(server.base)
        if sample(fams, "vllm:kv_cache_usage_perc") == 0 and \
                sample(fams, "vllm:num_requests_running") == 0:
            break
        time.sleep(0.5)
    assert sample(fams, "vllm:kv_cache_usage_perc") == 0
    # ... and the pool still serves a full request afterwards.
    assert run(complete(client, passages[0]))


def test_metrics_parse_and_carry_every_csr_metric(server, client, passages):
    run(complete(client, passages[1]))
    time.sleep(1.5)  # one refresh of the poller
    fams = families(server.base)
    want = set(GAUGES) | {"csr:encode_seconds", "csr:encoded_vectors"}
    assert want <= set(fams), sorted(want - set(fams))
    st = get_json(server.base + "/csr/stats", KEY)
    assert sample(fams, "csr:compression_ratio") == pytest.approx(st["compression_ratio"])
    assert sample(fams, "csr:kv_capacity_tokens") == st["kv_capacity_tokens"]
    assert sample(fams, "csr:encode_seconds", "_count") > 0
    # The poller mirrors the workers' totals exactly (no request ran since the last refresh).
    assert sample(fams, "csr:encode_seconds", "_count") == st["encode"]["calls"]
    assert sample(fams, "csr:encoded_vectors", "_total") == st["encode"]["vectors"]
    for fam in fams.values():
        if fam.name.startswith("csr:"):
            assert fam.documentation and ("in " in fam.documentation or "ratio" in
                                          fam.documentation or "Constant" in fam.documentation)


def test_mismatched_dictionary_exits_before_listening(model_dir, tmp_path):
    from csr_vllm.codec.dictionary import ModelShape
    from csr_vllm.codec.identity import identity_dictionary

    identity_dictionary(ModelShape("LlamaForCausalLM", 12, 3, 64, 10000.0, "other")).save(tmp_path)
    srv = ServerProcess(str(model_dir), ["--kv-cache-backend", "csr", "--csr-dict",
                                         str(tmp_path), "--enforce-eager"],
                        {"VLLM_CPU_KVCACHE_SPACE": "1"})
    with pytest.raises(RuntimeError, match="did not become healthy"):
        srv.start(timeout=600)
    assert srv.proc.returncode not in (0, None)
    log = srv.log()
    assert "made for another model" in log and "num_layers: dictionary has 12" in log
    assert "Starting vLLM server" not in log and "Uvicorn running" not in log

