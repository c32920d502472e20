"""The screened atom search (csr_vllm/codec/search.py): clusters, the reference's picks
against brute force, the setting at every edge (codec, harness, engine settings, flag)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from csr_vllm.codec.codec import TensorCodec
from csr_vllm.codec.config import TensorCodecConfig
from csr_vllm.codec.pursuit import best_atom
from csr_vllm.codec.search import AtomClusters, SearchSpec, cluster_atoms


def unit(gen, n: int, d: int) -> torch.Tensor:
    a = torch.randn(n, d, generator=gen)
    return a / a.norm(dim=-1, keepdim=True)


def test_clusters_partition_the_atoms_by_nearest_direction(gen):
    atoms = unit(gen, 500, 16)
    order, cent, off = cluster_atoms(atoms, 24)
    assert sorted(order.tolist()) == list(range(500))
    assert off[0] == 0 and off[-1] == 500 and bool((off[1:] >= off[:-1]).all())
    torch.testing.assert_close(cent.norm(dim=1), torch.ones(24))
    nearest = (atoms[order] @ cent.T).abs().argmax(1)  # d and -d are one direction
    sizes = off[1:] - off[:-1]
    assert torch.equal(nearest, torch.repeat_interleave(torch.arange(24), sizes))
    again = cluster_atoms(atoms, 24)
    assert all(torch.equal(a, b) for a, b in zip((order, cent, off), again, strict=True))


def test_a_screened_pick_is_the_best_atom_of_the_probed_clusters(gen):
    atoms = unit(gen, 400, 16)
    order, cent, off = cluster_atoms(atoms, 20)
    atoms = atoms[order]
    clusters = AtomClusters(cent, off, probes=3)
    r = torch.randn(64, 16, generator=gen)
    idx, val = best_atom(r, atoms, clusters=clusters)
    for i in range(64):
        probed = (r[i] @ cent.T).abs().topk(3).indices
        members = torch.cat([torch.arange(int(off[c]), int(off[c + 1])) for c in probed])
        corr = atoms[members] @ r[i]
        j = members[corr.abs().argmax()]
        assert int(idx[i]) == int(j) and float(val[i]) == pytest.approx(float(r[i] @ atoms[j]))


def test_probing_every_cluster_is_the_full_search(gen):
    cfg = TensorCodecConfig(300, 1, 4, "fp8")
    atoms = unit(gen, 300, 16)
    order, cent, off = cluster_atoms(atoms, 10)
    full = TensorCodec(cfg, atoms[order][None])
    every = TensorCodec(dataclasses.replace(cfg, search="10/10"), atoms[order][None], None,
                        (cent[None], off[None]))
    x = torch.randn(50, 16, generator=gen)
    a, b = full.encode(x), every.encode(x)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.coefs, b.coefs)


def test_the_search_setting_is_validated():
    assert SearchSpec.parse("256/32") == SearchSpec(256, 32) and SearchSpec.parse("full").full
    for bad in ("abc", "0/4", "8/16", "256", "-1/2"):
        with pytest.raises(ValueError, match="search|probe|clusters"):
            SearchSpec.parse(bad)
    with pytest.raises(ValueError, match="search"):
        TensorCodecConfig(search="fast")
    cfg = TensorCodecConfig(300, 1, 4, "fp8", search="10/2")
    with pytest.raises(ValueError, match="needs clusters"):
        TensorCodec(cfg, torch.ones(1, 300, 16) / 4)  # no clusters given


def test_engine_settings_and_harness_accept_the_search_and_refuse_bad_ones():
    from csr_vllm.engine.settings import CSRConfigError, settings_from_additional_config
    from csr_vllm.evaluation.methods import _csr_options

    ok = settings_from_additional_config({"kv_cache_backend": "csr",
                                          "csr": {"search": "256/32"}})
    assert ok.search == "256/32"
    with pytest.raises(CSRConfigError, match="csr.search"):
        settings_from_additional_config({"kv_cache_backend": "csr", "csr": {"search": "x"}})
    assert _csr_options("csr-2b+search=128/16")[1]["search"] == SearchSpec(128, 16)
    with pytest.raises(ValueError, match="search"):
        _csr_options("csr-2b+search=128")


def test_clusters_are_computed_once_and_read_back_from_the_cache(tmp_path, monkeypatch):
    from csr_vllm.codec import search

    gen = torch.Generator().manual_seed(4)
    atoms = unit(gen, 3 * 2 * 90, 12).reshape(3, 2, 1, 90, 12)
    first = search.clusters_of(atoms, 6, cache=tmp_path)
    for i in range(3):  # each dictionary clustered on its own
        for h in range(2):
            ref = cluster_atoms(atoms[i, h, 0], 6)
            for got, want in zip((x[i, h, 0] for x in first), ref, strict=True):
                assert torch.equal(got, want)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))

    def no_clustering(*_a, **_k):
        raise AssertionError("clustered again instead of reading the cache")

    with monkeypatch.context() as m:
        m.setattr(search, "cluster_atoms", no_clustering)
        again = search.clusters_of(atoms, 6, cache=tmp_path)
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    # Other atoms or another K: another entry, never the first one's order.
    other = search.clusters_of(atoms.flip(3), 6, cache=tmp_path)
    assert not torch.equal(other[0], first[0])
    search.clusters_of(atoms, 5, cache=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    # A damaged entry (not a file, or not a permutation) is recomputed and rewritten.
    files[0].write_bytes(b"garbage")
    assert torch.equal(search.clusters_of(atoms, 6, cache=tmp_path)[0], first[0])
    from safetensors.torch import save_file

    save_file({"order": torch.zeros_like(first[0]), "centroids": first[1],
               "offsets": first[2]}, files[0])
    assert torch.equal(search.clusters_of(atoms, 6, cache=tmp_path)[0], first[0])
    # A cache that cannot be written costs the computation only.
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert torch.equal(search.clusters_of(atoms, 6, cache=blocked / "sub")[0], first[0])


def test_a_dictionary_ordered_for_search_codes_shards_and_refuses_to_save(tmp_path):
    from csr_vllm.codec.config import CodecConfig
    from csr_vllm.codec.dictionary import DictionaryError, DictionarySet, ModelShape
    from csr_vllm.codec.search import ordered_for_search

    gen = torch.Generator().manual_seed(1)
    shape = ModelShape("LlamaForCausalLM", 4, 2, 16, 10000.0, "tiny")
    cfg = CodecConfig(key=TensorCodecConfig(200, 1, 3, "fp8"),
                      value=TensorCodecConfig(200, 1, 3, "fp8"))
    atoms = [unit(gen, 4 * 200, 16).reshape(4, 1, 1, 200, 16) for _ in range(2)]
    dicts = DictionarySet(cfg, shape, *atoms)
    ordered = ordered_for_search(dicts, SearchSpec(8, 2))
    assert ordered.config.key.search == "8/2" and ordered.nbytes > dicts.nbytes
    for layer in range(4):  # the same atoms, reordered
        a, b = dicts.codec("key", layer).atoms[0], ordered.codec("key", layer).atoms[0]
        assert not torch.equal(a, b)
        torch.testing.assert_close(a.sum(0), b.sum(0))
        torch.testing.assert_close(a.sort(0).values, b.sort(0).values)
    x = torch.randn(20, 16, generator=gen)
    part = ordered.shard(layers=(2, 4))
    assert torch.equal(part.codec("value", 3).encode(x).indices,
                       ordered.codec("value", 3).encode(x).indices)
    with pytest.raises(DictionaryError, match="screened search"):
        ordered.save(tmp_path)
