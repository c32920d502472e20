"""The KV pool ``csr-vllm serve`` picks: free memory in, decision out (csr_vllm.kv_budget)."""

from __future__ import annotations

import pytest

from csr_vllm import kv_budget as kb
from csr_vllm.cli import main
from csr_vllm.kv_budget import GiB, MiB, NotEnoughMemory, PoolNeeds, choose_kv_budget

# SmolLM2-135M with csr-2b: 30 layers x 3 KV heads x 32 B a slot.
SMOL = PoolNeeds(process_bytes=3 * GiB, side_bytes=200 * MiB, bytes_per_token=2880,
                 max_model_len=8192, max_num_seqs=128)


def test_plenty_of_memory_is_capped_at_what_the_scheduler_can_hold():
    b = choose_kv_budget(16 * GiB, SMOL)
    assert b.kv_bytes == 128 * 8192 * 2880 == SMOL.ceiling_bytes
    assert b.flags() == ["--kv-cache-memory-bytes", str(b.kv_bytes)]
    assert "16.00 GiB free" in b.line and "3.20 GiB reserved" in b.line
    assert "128 x 8,192 tokens x 2,880 B/token" in b.line


def test_less_memory_takes_a_share_of_what_is_left_after_the_reserve():
    needs = PoolNeeds(3 * GiB, 200 * MiB, 2880, 8192, 1024)  # ceiling 22.5 GiB
    b = choose_kv_budget(8 * GiB, needs)
    room = 8 * GiB - 3 * GiB - 200 * MiB
    assert b.kv_bytes == int(kb.KEEP_FRACTION * room)
    assert b.kv_bytes + needs.reserve_bytes < 8 * GiB
    assert "scheduler" not in b.line and f"{b.kv_bytes}" in b.line


def test_a_store_that_grows_with_the_pool_takes_its_share_of_the_room():
    # Qwen2.5-Coder-1.5B at csr-2b, layer 0 dense: 28 x 2 x 64 B in the pool, 2 x 512 B beside.
    needs = PoolNeeds(5 * GiB, 300 * MiB, 3584, 32768, 1024, side_bytes_per_token=1024)
    b = choose_kv_budget(12 * GiB, needs)
    room = 12 * GiB - 5 * GiB - 300 * MiB
    assert b.kv_bytes == int(kb.KEEP_FRACTION * room * 3584 / (3584 + 1024))
    store = b.kv_bytes // 3584 * 1024
    assert b.kv_bytes + store + needs.reserve_bytes <= 12 * GiB
    assert "dense layers' store takes 1,024 B per pool token" in b.line


def test_a_budget_holds_at_least_one_full_length_sequence_or_stops():
    needs = SMOL
    just = needs.reserve_bytes + int(needs.minimum_bytes / kb.KEEP_FRACTION) + 4
    assert choose_kv_budget(just, needs).kv_bytes >= needs.minimum_bytes
    with pytest.raises(NotEnoughMemory) as e:
        choose_kv_budget(just - 16, needs)
    msg = str(e.value)
    assert "\n" not in msg and "free on node 0" in msg and "--kv-cache-memory-bytes" in msg
    assert "--max-model-len 8192" in msg


def test_too_little_memory_says_how_much_is_free_and_what_to_pass():
    with pytest.raises(NotEnoughMemory, match=r"only 2\.00 GiB of memory is free on node 0; "
                       r"serving needs about 3\.2\d GiB .*csr-vllm serve -- "
                       r"--kv-cache-memory-bytes \d+"):
        choose_kv_budget(2 * GiB, SMOL)
    with pytest.raises(NotEnoughMemory):  # nothing free at all
        choose_kv_budget(0, SMOL)


@pytest.mark.parametrize("args, env, named", [
    (["--kv-cache-memory-bytes", "1000000"], {}, "--kv-cache-memory-bytes"),
    (["--kv_cache_memory_bytes=1000000"], {}, "--kv-cache-memory-bytes"),
    (["--gpu-memory-utilization", "0.5"], {}, "--gpu-memory-utilization"),
    (["--device-memory-utilization=0.5"], {}, "--device-memory-utilization"),
    ([], {"VLLM_CPU_KVCACHE_SPACE": "2"}, "VLLM_CPU_KVCACHE_SPACE=2"),
])
def test_the_users_own_size_wins_and_nothing_is_passed(args, env, named):
    override = kb.user_override(["--max-num-seqs", "4", *args], env)
    assert override == named
    b = choose_kv_budget(0, SMOL, override)  # even with no memory: the user decides
    assert b.kv_bytes is None and b.flags() == [] and named in b.line


def test_no_override_without_a_flag_or_with_an_empty_variable():
    assert kb.user_override(["--max-model-len", "512"], {"VLLM_CPU_KVCACHE_SPACE": ""}) is None
    assert kb.user_override([], {}) is None


def test_pool_sizing_flags_are_read_from_the_vllm_arguments():
    args = ["--max-model-len=2048", "--max-num-seqs", "4", "--enforce-eager"]
    assert kb.int_flag(args, "--max-model-len", 8192) == 2048
    assert kb.int_flag(args, "--max-num-seqs", 128) == 4
    assert kb.int_flag(["--max-model-len", "8k"], "--max-model-len", 8192) == 8192
    assert kb.int_flag([], "--max-num-seqs", 128) == 128


# -- through `csr-vllm serve --dry-run` (the real model, a random dictionary of the default
# shape: 8192 atoms per layer, keys before RoPE, ladder tops; no training needed) ------------
@pytest.fixture(scope="module")
def shape(model_dir):
    from transformers import AutoConfig

    from csr_vllm.codec.dictionary import ModelShape

    return ModelShape.from_hf_config(AutoConfig.from_pretrained(model_dir))


@pytest.fixture(scope="module")
def random_dict(tmp_path_factory, shape):
    import torch

    from csr_vllm.codec.coefficients import ladder_positions
    from csr_vllm.codec.config import get_preset
    from csr_vllm.codec.dictionary import DictionarySet

    cfg = get_preset("csr-2b").config_for(shape.head_dim)
    g = torch.Generator().manual_seed(0)
    atoms = [torch.randn(shape.num_layers, 1, 1, cfg.key.num_atoms, shape.head_dim, generator=g)
             for _ in range(2)]
    atoms = [a / a.norm(dim=-1, keepdim=True) for a in atoms]
    p = ladder_positions(shape.head_dim)
    ladders = [torch.ones(shape.num_layers, 1, 1, p, p) for _ in range(2)]
    folder = tmp_path_factory.mktemp("random-dict")
    DictionarySet(cfg, shape, *atoms, {"kind": "random (test)"}, key_ladder=ladders[0],
                  value_ladder=ladders[1]).save(folder)
    return str(folder)


@pytest.fixture(scope="module")
def identity_dict(tmp_path_factory, shape):
    from csr_vllm.codec.identity import identity_dictionary

    folder = tmp_path_factory.mktemp("identity")
    identity_dictionary(shape).save(folder)
    return str(folder)


def serve_dry_run(folder, capsys, *extra):
    main(["serve", "--dict", folder, "--dry-run", *extra])
    return capsys.readouterr().out


@pytest.mark.slow
def test_dry_run_prints_and_passes_the_budget(random_dict, capsys, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(kb, "node_available_memory", lambda: (0, 12 * GiB))
    out = serve_dry_run(random_dict, capsys, "--", "--max-num-seqs", "4")
    line = next(ln for ln in out.splitlines() if ln.startswith("KV budget:"))
    chosen = int(line.split("--kv-cache-memory-bytes ")[1].split(")")[0])
    # 4 sequences of 8,192 tokens at csr-2b's 2,880 B/token: the ceiling, far under 12 GiB.
    assert chosen == 4 * 8192 * 2880 and "12.00 GiB free on NUMA node 0" in line
    serving = next(ln for ln in out.splitlines() if ln.startswith("serving:"))
    assert serving.endswith(f"--max-num-seqs 4 --kv-cache-memory-bytes {chosen}")
    assert f"--csr-dict {random_dict}" in serving


@pytest.mark.slow
def test_dry_run_leaves_the_users_size_alone(random_dict, capsys, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    out = serve_dry_run(random_dict, capsys)
    assert "KV budget:  VLLM_CPU_KVCACHE_SPACE=1 given" in out
    assert "--kv-cache-memory-bytes" not in out
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    out = serve_dry_run(random_dict, capsys, "--", "--kv-cache-memory-bytes", "123456789")
    assert out.count("--kv-cache-memory-bytes") == 2  # the line naming it, and the user's flag
    assert "--kv-cache-memory-bytes 123456789" in out.splitlines()[-1]


@pytest.mark.slow
def test_too_little_memory_stops_with_one_line(random_dict, capsys, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(kb, "node_available_memory", lambda: (0, 1 * GiB))
    with pytest.raises(SystemExit) as e:
        serve_dry_run(random_dict, capsys)
    assert str(e.value).startswith("error: only 1.00 GiB of memory is free on NUMA node 0")
    assert "--kv-cache-memory-bytes" in str(e.value) and "\n" not in str(e.value)
    assert "serving:" not in capsys.readouterr().out


@pytest.mark.slow
def test_a_dictionary_that_does_not_fit_the_preset_stops_with_one_line(identity_dict):
    with pytest.raises(SystemExit, match=r"^error: dictionary does not fit this codec setting: "
                       r"key atoms: dictionary has 64, requested 8192"):
        main(["serve", "--dict", identity_dict, "--dry-run"])


@pytest.mark.slow
def test_other_platforms_keep_vllms_own_default(random_dict, capsys, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(kb, "is_cpu_build", lambda: False)
    out = serve_dry_run(random_dict, capsys)
    assert "KV budget" not in out and "--kv-cache-memory-bytes" not in out
