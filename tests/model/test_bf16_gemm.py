"""model/bf16_gemm.py: the decode step's bf16 kernel against F.linear, its build and its switch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from model import bf16_gemm
from model.engine import DecoderEngine

needs_kernel = pytest.mark.skipif(
    bf16_gemm.unavailable_reason() is not None,
    reason=f"bf16 kernel unavailable here: {bf16_gemm.unavailable_reason()}",
)


def _close_to_float(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """y is the float32 product rounded once to bf16, up to summation order: within one bf16
    step (2^-8 relative) of the exact value, plus what the order moves a sum near zero."""
    exact = x.float() @ w.float().T
    scale = (x.float().abs() @ w.float().abs().T).clamp(min=1e-6)  # the sum's magnitude bound
    err = (y.float() - exact).abs()
    assert bool((err <= exact.abs() * 2**-8 + scale * 1e-6).all()), float((err / scale).max())


@needs_kernel
@pytest.mark.parametrize(("n", "k"), [(16, 2), (48, 64), (960, 576), (576, 1536), (64, 70)])
def test_the_kernel_computes_x_w_transposed_at_every_row_count(n, k):
    torch.manual_seed(n + k)
    w = (torch.randn(n, k) * 0.05).to(torch.bfloat16)
    packed = bf16_gemm.pack(w)
    for m in range(1, bf16_gemm.ROWS + 1):  # every tile remainder, both thread halves
        x = torch.randn(m, k).to(torch.bfloat16)
        y = bf16_gemm.linear(x, packed)
        assert y.shape == (m, n) and y.dtype == torch.bfloat16
        _close_to_float(y, x, w)
        ref = F.linear(x, w)  # oneDNN: the same rounding, another summation order
        assert float((y == ref).float().mean()) > 0.98, m


@needs_kernel
def test_the_kernel_reads_non_contiguous_rows_and_any_thread_count():
    w = torch.randn(96, 64).to(torch.bfloat16)
    packed = bf16_gemm.pack(w)
    x = torch.randn(64, 3).to(torch.bfloat16).T  # (3, 64), not contiguous
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = bf16_gemm.linear(x, packed)
        torch.set_num_threads(2)
        two = bf16_gemm.linear(x, packed)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # threads split the outputs, never a sum
    _close_to_float(one, x, w)


@needs_kernel
def test_the_kernel_refuses_what_it_cannot_compute():
    packed = bf16_gemm.pack(torch.randn(32, 8).to(torch.bfloat16))
    with pytest.raises(ValueError, match="rows"):
        bf16_gemm.linear(torch.randn(bf16_gemm.ROWS + 1, 8).to(torch.bfloat16), packed)
    with pytest.raises(ValueError, match=r"\(M, 8\) bfloat16"):
        bf16_gemm.linear(torch.randn(2, 6).to(torch.bfloat16), packed)
    with pytest.raises(ValueError, match="bfloat16"):
        bf16_gemm.linear(torch.randn(2, 8), packed)
    with pytest.raises(ValueError, match="pack"):  # not the kernel's layout: refused, never read
        bf16_gemm.linear(torch.randn(2, 8).to(torch.bfloat16), torch.randn(32, 8).to(torch.bfloat16))
    with pytest.raises(ValueError, match="pack"):
        bf16_gemm.linear(torch.randn(2, 8).to(torch.bfloat16), packed[:, :2])  # a strided slice
    assert not bf16_gemm.fits(torch.randn(40, 8).to(torch.bfloat16))  # 40 rows: not whole groups
    assert not bf16_gemm.fits(torch.randn(32, 7).to(torch.bfloat16))  # odd K
    assert not bf16_gemm.fits(torch.randn(32, 8))  # float32
    assert bf16_gemm.fits(torch.randn(32, 8).to(torch.bfloat16))


@needs_kernel
def test_the_build_is_cached_under_a_hash_of_source_and_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("R2EC_KERNEL_CACHE", str(tmp_path))
    compiler = bf16_gemm._compiler()
    path = bf16_gemm.build(compiler)
    assert path == bf16_gemm.library_path()
    assert path.parent == tmp_path and path.name.startswith("bf16_gemm-") and path.suffix == ".so"
    stamp = path.stat().st_mtime_ns
    assert bf16_gemm.build(compiler) == path and path.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    assert path.stat().st_mode & 0o555 == 0o555  # the image's non-root server loads what root built


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("R2EC_KERNEL_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="failed"):
        bf16_gemm.build("false")  # a "compiler" that fails
    assert list(tmp_path.iterdir()) == []


def test_the_switch_turns_the_kernel_off_and_the_engine_keeps_onednn(tiny_model, monkeypatch):
    monkeypatch.setenv("R2EC_BF16_KERNEL", "off")
    bf16_gemm._load.cache_clear()
    try:
        assert "R2EC_BF16_KERNEL" in bf16_gemm.unavailable_reason()
        engine = DecoderEngine(copy.deepcopy(tiny_model.lm).to(torch.bfloat16), slots=1)
        assert engine.kernel_reason is not None and engine.layers[0].qkv.kernel is None
    finally:
        monkeypatch.delenv("R2EC_BF16_KERNEL")
        bf16_gemm._load.cache_clear()


@needs_kernel
def test_the_engine_takes_the_kernel_for_few_rows_and_onednn_for_many(tiny_model):
    lm = copy.deepcopy(tiny_model.lm).to(torch.bfloat16)
    engine = DecoderEngine(lm, slots=1)
    assert engine.kernel_reason is None
    lin = engine.layers[0].gate_up
    assert lin.kernel is not None
    for rows in (1, 9, bf16_gemm.ROWS):  # decode steps, speculative checks: the kernel
        x = torch.randn(rows, lin.weight.shape[1], dtype=torch.bfloat16)
        assert torch.equal(lin(x), bf16_gemm.linear(x, lin.kernel)), rows
    for rows in (bf16_gemm.ROWS + 1, 64):  # prefills: oneDNN, F.linear's numbers
        x = torch.randn(rows, lin.weight.shape[1], dtype=torch.bfloat16)
        assert torch.equal(lin(x), F.linear(x, lin.weight)), rows
    # exact mode (R2EC_EXACT_DECODE) and float32 models never take it
    assert DecoderEngine(lm, slots=1, exact=True).layers[0].qkv.kernel is None
    assert DecoderEngine(tiny_model.lm, slots=1).layers[0].qkv.kernel is None


@needs_kernel
def test_decode_steps_through_the_kernel_match_a_prefill(tiny_model):
    lm = copy.deepcopy(tiny_model.lm).to(torch.bfloat16)
    ids = list(range(5, 40))
    engine = DecoderEngine(lm, slots=1)
    ref = engine.prefill(0, ids)[-1]  # 35 rows: oneDNN
    engine.reset(0)
    engine.prefill(0, ids[:-1])
    step = engine.decode([ids[-1]])[0]  # one row: the kernel
    assert F.cosine_similarity(step.float(), ref.float(), dim=0) > 0.999
    torch.testing.assert_close(engine.logits(step[None]), engine.logits(ref[None]), atol=0.1, rtol=0.05)


@needs_kernel
def test_a_library_built_ahead_of_time_needs_no_compiler(tmp_path, monkeypatch):
    # the Docker image: `python -m model.bf16_gemm --build`, then the compiler is removed
    monkeypatch.setenv("R2EC_KERNEL_CACHE", str(tmp_path))
    assert bf16_gemm.main(["--build"]) == 0 and bf16_gemm.library_path().exists()
    monkeypatch.setenv("CXX", "no-such-compiler")
    bf16_gemm._load.cache_clear()
    try:
        assert bf16_gemm.unavailable_reason() is None
        w = torch.randn(32, 8).to(torch.bfloat16)
        x = torch.randn(3, 8).to(torch.bfloat16)
        _close_to_float(bf16_gemm.linear(x, bf16_gemm.pack(w)), x, w)
        bf16_gemm._load.cache_clear()
        monkeypatch.setenv("R2EC_KERNEL_CACHE", str(tmp_path / "empty"))  # nothing built there
        assert "no C++ compiler" in bf16_gemm.unavailable_reason()
        assert bf16_gemm.main(["--build"]) == 1
    finally:
        monkeypatch.undo()
        bf16_gemm._load.cache_clear()


@needs_kernel
def test_a_damaged_library_in_the_cache_is_built_again(tmp_path, monkeypatch):
    # e.g. one a power loss cut short: loading it fails, and it used to stay, keeping the
    # kernel off on that machine until someone deleted it
    monkeypatch.setenv("R2EC_KERNEL_CACHE", str(tmp_path))
    bf16_gemm.library_path().write_bytes(b"\x7fELF cut short")
    bf16_gemm._load.cache_clear()
    try:
        assert bf16_gemm.unavailable_reason() is None
        assert bf16_gemm.library_path().stat().st_size > 1000
    finally:
        monkeypatch.undo()
        bf16_gemm._load.cache_clear()


def test_a_broken_cache_leaves_onednn_in_place(tmp_path, monkeypatch):
    # e.g. a cache path that is a file: the reason is returned, the service still starts
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("R2EC_KERNEL_CACHE", str(blocker / "kernels"))
    bf16_gemm._load.cache_clear()
    try:
        reason = bf16_gemm.unavailable_reason()
        assert reason is not None
        if "AVX512-BF16" not in reason and "x86-64" not in reason:  # got as far as the build
            assert "could not build or load" in reason or "no C++ compiler" in reason
    finally:
        monkeypatch.undo()
        bf16_gemm._load.cache_clear()


def test_build_skips_a_machine_that_is_not_x86(monkeypatch, capsys):
    monkeypatch.setattr(bf16_gemm.platform, "machine", lambda: "aarch64")
    assert bf16_gemm.main(["--build"]) == 0  # an arm64 image build goes on, on oneDNN
    assert "not built" in capsys.readouterr().out


def test_the_cache_follows_r2ec_settings(tmp_path, monkeypatch):
    monkeypatch.delenv("R2EC_KERNEL_CACHE", raising=False)
    monkeypatch.setenv("R2EC_CACHE_DIR", str(tmp_path / "r2ec"))
    assert bf16_gemm.cache_dir() == tmp_path / "r2ec" / "kernels"  # beside the converted backbones
    monkeypatch.setenv("R2EC_KERNEL_CACHE", str(tmp_path / "k"))
    assert bf16_gemm.cache_dir() == tmp_path / "k"  # the image's prebuilt one wins
    monkeypatch.delenv("R2EC_KERNEL_CACHE")
    monkeypatch.delenv("R2EC_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert bf16_gemm.cache_dir() == tmp_path / "home" / ".cache" / "r2ec" / "kernels"  # as backbones


def test_the_service_reports_the_matmul_path(tiny_model, monkeypatch):
    # r2ec_model_info's decode_matmuls label (service/recommender.py `decode_matmuls`)
    from types import SimpleNamespace

    from model.generation import EngineBackend, HFBackend
    from service.recommender import Recommender

    def path(backend) -> str:
        return Recommender.decode_matmuls.fget(SimpleNamespace(backend=backend))

    bf16 = copy.copy(tiny_model)
    bf16.lm = copy.deepcopy(tiny_model.lm).to(torch.bfloat16)
    expected = "bf16_kernel" if bf16_gemm.unavailable_reason() is None else "onednn"
    assert path(EngineBackend(bf16, slots=1)) == expected
    assert path(EngineBackend(bf16, slots=1, exact=True)) == "onednn"
    assert path(EngineBackend(tiny_model, slots=1)) == "onednn"  # float32
    assert path(EngineBackend(bf16, slots=1, quantize="int8")) == f"int8+{expected}"
    assert path(HFBackend(tiny_model)) == "hf"
