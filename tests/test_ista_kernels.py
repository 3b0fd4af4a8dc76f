"""The fused Triton ISTA kernels against the float64 reference: the codes and every gradient.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, fp32 only: the
interpreter's bf16 `tl.dot` is wrong); with CUDA the same tests run the compiled kernels, and the
bf16 and training checks run too. Every kernel buffer starts as NaN, so a tile that a kernel forgets
to write shows up as a mismatch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from crate.kernels import ista
from crate.kernels.ista import ista_codes, ista_reference

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled Triton kernels, bf16)")

# (v shape, h, ista steps): token counts and widths that are not multiples of any tile, and h = 4d.
CASES = [
    ((1, 7, 48), 192, 1),
    ((1, 7, 48), 192, 2),
    ((1, 7, 48), 192, 3),
    ((2, 9, 72), 200, 1),
    ((2, 9, 72), 200, 2),
    ((2, 9, 72), 200, 3),
    ((3, 33, 128), 512, 2),
]


@pytest.fixture(autouse=True, scope="module")
def _interpreter_without_cuda() -> Iterator[None]:
    """Set TRITON_INTERPRET=1 for this module only, before its first kernel launch defines the kernels."""
    with pytest.MonkeyPatch.context() as mp:
        if not CUDA:
            mp.setenv("TRITON_INTERPRET", "1")
        yield


@pytest.fixture(autouse=True)
def _poisoned_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    def alloc(like: Tensor, *shape: int, dtype: torch.dtype | None = None) -> Tensor:
        return like.new_full(shape, math.nan, dtype=dtype)

    monkeypatch.setattr(ista, "_alloc", alloc)


def _inputs(shape: tuple[int, ...], h: int, dtype: torch.dtype = torch.float64) -> list[Tensor]:
    """v like a LayerNorm output, the dictionary at its kaiming-uniform init, the paper's eta and lambda."""
    d = shape[-1]
    v = torch.randn(shape, dtype=dtype, device=DEVICE)
    weight = (torch.rand(h, d, dtype=dtype, device=DEVICE) * 2 - 1) * math.sqrt(6 / d)
    eta = torch.tensor(0.1, dtype=dtype, device=DEVICE)
    lmbda = torch.tensor(0.1, dtype=dtype, device=DEVICE)
    return [t.requires_grad_() for t in (v, weight, eta, lmbda)]


def _as(leaves: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    return [t.detach().to(dtype).requires_grad_() for t in leaves]


def _close(got: Tensor, want: Tensor, rel: float = 1e-5) -> None:
    """fp32 against float64: errors of a few ulps of the largest entry, none of them NaN."""
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=rel * want.abs().max().item())


@pytest.mark.parametrize("shape, h, steps", CASES)
def test_codes_are_sparse_but_not_zero(shape: tuple[int, ...], h: int, steps: int) -> None:
    v, weight, eta, lmbda = _inputs(shape, h)
    for n in sorted({1, steps}):
        active = (ista_reference(v, weight, eta, lmbda, n) > 0).double().mean().item()
        assert 0.1 < active < 0.9, f"{n}-step codes are {active:.0%} active: the comparisons would mean little"


@pytest.mark.parametrize("shape, h, steps", CASES)
def test_codes_and_gradients_match_float64_reference(shape: tuple[int, ...], h: int, steps: int) -> None:
    leaves = _inputs(shape, h)
    want = ista_reference(*leaves, steps)
    grad_out = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, leaves, grad_out)

    ours = _as(leaves, torch.float32)
    got = ista_codes(*ours, steps, impl="triton")
    got_grads = torch.autograd.grad(got, ours, grad_out.float())

    _close(got, want)
    for name, g, w in zip(("v", "weight", "eta", "lmbda"), got_grads, want_grads):
        assert g.shape == w.shape and g.dtype == torch.float32, name
        _close(g, w)


def test_python_float_eta_lambda() -> None:
    v, weight, _, _ = _inputs((2, 9, 72), 200)
    want = ista_reference(v, weight, 0.1, 0.3, 2)
    grad_out = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (v, weight), grad_out)
    ours = _as([v, weight], torch.float32)
    got = ista_codes(*ours, 0.1, 0.3, 2, impl="triton")
    _close(got, want)
    for g, w in zip(torch.autograd.grad(got, ours, grad_out.float()), want_grads):
        _close(g, w)


def test_every_buffer_is_written() -> None:
    """The ops' own outputs, intermediates included, are finite and right although they started as NaN."""
    v, weight, eta, lmbda = _inputs((2, 9, 72), 200)
    x, w = v.detach().float().reshape(-1, 72), weight.detach().float()
    scal = torch.tensor([0.1, 0.1], device=DEVICE)
    codes, code_hist, resid_hist = torch.ops.crate.ista_forward(x, w, scal, 3)
    for k, a in enumerate([*code_hist, codes], start=1):
        _close(a, ista_reference(v, weight, eta, lmbda, k).detach().reshape(-1, 200))
    assert torch.isfinite(resid_hist).all()
    grad = torch.randn_like(codes)
    grads = torch.ops.crate.ista_backward(grad, x, w, scal, codes, code_hist, resid_hist, 3, True)
    assert all(torch.isfinite(g).all() for g in grads)
    # Recompute mode: the forward returns no history, the backward rebuilds it in its own (NaN) buffers.
    codes2, code_hist2, resid_hist2 = torch.ops.crate.ista_forward(x, w, scal, 3, True)
    assert code_hist2.shape == (0, 18, 200) and resid_hist2.shape == (0, 18, 72)
    torch.testing.assert_close(codes2, codes, rtol=0, atol=0)
    grads2 = torch.ops.crate.ista_backward(grad, x, w, scal, codes2, None, None, 3, True)
    for g, g2 in zip(grads, grads2):
        torch.testing.assert_close(g2, g, rtol=0, atol=0)


@pytest.mark.parametrize("recompute", [False, True])
def test_torch_compile_fullgraph_matches_eager(recompute: bool) -> None:
    """The custom ops trace without graph breaks, with their fake and autograd registrations."""
    v, weight, eta, _ = _as(_inputs((2, 7, 48), 192), torch.float32)
    norm = torch.nn.LayerNorm(48, device=DEVICE)

    def loss(x: Tensor, impl: str) -> Tensor:
        a = ista_codes(norm(x), weight, eta, 0.1, 2, impl, recompute=recompute)
        return (a @ weight).square().mean()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(v, "triton")
    got_grads = torch.autograd.grad(got, (v, weight, eta))
    want = loss(v, "torch")
    want_grads = torch.autograd.grad(want, (v, weight, eta))
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_recompute_mode_matches_store_all_and_reference(steps: int) -> None:
    """recompute=True reruns the same forward kernels in backward: the same codes and gradients, bit for bit."""
    leaves = _inputs((3, 11, 48), 192)
    want = ista_reference(*leaves, steps)
    grad_out = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, leaves, grad_out)

    results = {}
    for recompute in (False, True):
        ours = _as(leaves, torch.float32)
        got = ista_codes(*ours, steps, impl="triton", recompute=recompute)
        results[recompute] = [got, *torch.autograd.grad(got, ours, grad_out.float())]
    names = ("codes", "v", "weight", "eta", "lmbda")
    for name, stored, recomputed, w in zip(names, results[False], results[True], [want, *want_grads]):
        torch.testing.assert_close(recomputed, stored, rtol=0, atol=0, msg=name)
        _close(recomputed, w)


def _saved_bytes(fn: Callable[[], Tensor], held: list[Tensor]) -> tuple[int, int]:
    """Bytes autograd saves for backward while `fn` runs, each storage once: (all of them, those above
    what the block holds anyway, i.e. leaving out the storages of `held` and of fn's output)."""
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    anyway = {t.untyped_storage().data_ptr() for t in (*held, out)}
    return sum(saved.values()), sum(b for p, b in saved.items() if p not in anyway)


@pytest.mark.parametrize("learnable", [False, True])
def test_saved_bytes_recompute_at_most_half_of_eager(learnable: bool) -> None:
    """Counted with saved_tensors_hooks (device-independent), 2 steps, d=48 h=192, 33 tokens, fp32.

    Above what the block holds anyway (v, weight, eta/lmbda, the output codes): eager keeps a1 and r
    (plus D^T v and r D^T with learnable eta/lambda); store-all keeps a1 and r (and the 8-byte [eta,
    lambda]); recompute keeps only the 8 bytes. See benchmarks/RESULTS.md.
    """
    (N, d), h = (33, 48), 192
    v, weight, eta, lmbda = _as(_inputs((N, d), h), torch.float32)
    if not learnable:
        eta, lmbda = 0.1, 0.1
    held = [v, weight] + ([eta, lmbda] if learnable else [])

    def measure(impl: str, recompute: bool = False) -> tuple[int, int]:
        return _saved_bytes(lambda: ista_codes(v, weight, eta, lmbda, 2, impl, recompute=recompute), held)

    eager, stored, recomputed = measure("torch"), measure("triton"), measure("triton", True)
    a1, r, scal = 4 * N * h, 4 * N * d, 8
    assert eager[1] == a1 + r + (2 * a1 if learnable else 0)
    assert stored[1] == a1 + r + scal
    assert recomputed[1] == scal
    assert recomputed[1] <= 0.5 * eager[1]
    assert recomputed[0] == 4 * (N * d + h * d + N * h) + scal  # v, weight, codes: the block holds them anyway


def test_auto_takes_the_kernels_only_for_their_dtypes(monkeypatch: pytest.MonkeyPatch) -> None:
    """`auto` on a GPU: the fused kernels for fp32/bf16/fp16, the reference for float64 (the kernels refuse it)."""
    monkeypatch.setattr(ista, "triton_available", lambda: True)
    cuda = torch.device("cuda")
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    got = {dt: ista.resolve_impl("auto", cuda, dt) for dt in dtypes}
    assert got == {torch.float32: "triton", torch.bfloat16: "triton", torch.float16: "triton", torch.float64: "torch"}
    assert ista.resolve_impl("auto", torch.device("cpu"), torch.float32) == "torch"
    assert ista.resolve_impl("triton", cuda, torch.float64) == "triton"  # forced: ista_fused says why it cannot


def test_forced_triton_on_cpu_without_interpreter_says_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    v, weight = torch.randn(3, 16), torch.randn(64, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1.*ista_impl='torch'"):
        ista_codes(v, weight, 0.1, 0.1, 2, impl="triton")


def test_eta_zero_gives_the_references_gradients_not_nan() -> None:
    """At eta = 0 every pre-activation is 0: d/d eta is 0 by autograd's ReLU rule (the kernel divided 0 by 0)."""
    v, weight, _, lmbda = _inputs((2, 9, 72), 200)
    eta = torch.zeros((), dtype=torch.float64, device=DEVICE, requires_grad=True)
    leaves = [v, weight, eta, lmbda]
    want = ista_reference(*leaves, 2)
    grad_out = torch.randn_like(want)
    ours = _as(leaves, torch.float32)
    got = ista_codes(*ours, 2, impl="triton")
    for g, w in zip(torch.autograd.grad(got, ours, grad_out.float()), torch.autograd.grad(want, leaves, grad_out)):
        assert not g.isnan().any()
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5 * max(1.0, w.abs().max().item()))


@pytest.mark.skipif(CUDA, reason="Triton's interpreter only: compiled kernels compute bf16 correctly")
def test_bf16_in_the_interpreter_is_refused() -> None:
    v, weight = torch.randn(3, 16, dtype=torch.bfloat16), torch.randn(64, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="interpreter computes bf16.*ista_impl='torch'"):
        ista_codes(v, weight, 0.1, 0.1, 2, impl="triton")


def test_a_launch_counts_the_partial_sums_of_the_tile_it_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    """The autotuner calls the grid once per config it benchmarks, then for the launch; its `best_config` is per
    kernel, so another thread's launch of another shape may have changed it: the count follows the launch."""
    from types import SimpleNamespace

    from crate.kernels import ista_triton

    tiles = [dict(BLOCK_M=128, BLOCK_N=128), dict(BLOCK_M=64, BLOCK_N=128), dict(BLOCK_M=64, BLOCK_N=64)]

    class Autotuned:
        best_config = SimpleNamespace(kwargs=tiles[0])  # what another thread's launch left

        def __getitem__(self, grid: Callable[[dict], tuple[int]]) -> Callable[..., None]:
            return lambda *args, **kwargs: [grid(meta) for meta in tiles]  # benchmarking, then the launch

    monkeypatch.setattr(ista_triton, "INTERPRET", False)
    assert ista_triton.launch(Autotuned(), 300, 200) == math.ceil(300 / 64) * math.ceil(200 / 64)


@needs_cuda
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_bf16_error_at_most_twice_pytorchs(steps: int) -> None:
    """flash-attention's rule: against float64, the kernel may be at most 2x as wrong as PyTorch in bf16."""
    leaves = _inputs((4, 500, 256), 1024)
    want = ista_reference(*leaves, steps)
    grad_out = torch.randn_like(want)
    want_all = [want, *torch.autograd.grad(want, leaves, grad_out)]

    def run(impl: str) -> list[Tensor]:
        v, weight, eta, lmbda = leaves
        ours = _as([v, weight], torch.bfloat16) + _as([eta, lmbda], torch.float32)
        out = ista_codes(*ours, steps, impl=impl)
        return [out, *torch.autograd.grad(out, ours, grad_out.bfloat16())]

    for name, k, t, w in zip(("codes", "v", "weight", "eta", "lmbda"), run("triton"), run("torch"), want_all):
        kernel_err = (k.double() - w).abs().max().item()
        torch_err = (t.double() - w).abs().max().item()
        # eta's and lambda's gradients are single sums of ~1M bf16 products: their errors are one draw of a random
        # walk each, so "2x PyTorch's" fails by chance (1-2 of 8 seeds in an fp32-accumulating emulation); they
        # get bf16's relative precision instead (2^-8 = 0.4% per product, 2% here)
        slack = (2e-2 if name in ("eta", "lmbda") else 1e-4) * w.abs().max().item()
        assert kernel_err <= 2 * torch_err + slack, (name, kernel_err, torch_err)


@needs_cuda
def test_tiny_model_trains_like_reference() -> None:
    """50 bf16-autocast AdamW steps of the 2-layer tiny CRATE: the kernel's loss curve stays within
    bf16 noise of the reference's (noise measured as the reference's own bf16-vs-fp32 gap)."""
    import crate

    idx = torch.randint(0, 512, (8, 65), device=DEVICE)

    def curve(impl: str, autocast: bool) -> Tensor:
        torch.manual_seed(0)
        model = crate.build_model("crate", "tiny", ista_impl=impl).to(DEVICE)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for _ in range(50):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                logits = model(idx[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return torch.tensor(losses)

    kernel, reference, fp32 = curve("triton", True), curve("torch", True), curve("torch", False)
    noise = (reference - fp32).abs().max().item()
    assert reference[-1] < reference[0] - 1.0, "the run must learn for the curves to be comparable"
    assert (kernel - reference).abs().max().item() <= 2 * noise + 0.02, (kernel, reference, noise)


@pytest.mark.parametrize("recompute", [False, True])
def test_model_with_fused_kernels_matches_the_reference_model(recompute: bool) -> None:
    """The model's config reaches the kernels: `ista_impl: triton` (+ `ista_recompute`) vs `torch`, same weights."""
    import crate

    fused = crate.build_model("crate", "micro", ista_impl="triton", ista_recompute=recompute).to(DEVICE)
    eager = crate.build_model("crate", "micro", ista_impl="torch").to(DEVICE)
    eager.load_state_dict(fused.state_dict())
    idx = torch.randint(0, fused.config.vocab_size, (2, 13), device=DEVICE)
    calls = []
    real = ista.ista_fused
    with pytest.MonkeyPatch.context() as mp:  # the fused path is really taken, with the configured mode
        mp.setattr(ista, "ista_fused", lambda *a, **k: calls.append(k) or real(*a, **k))
        loss_f = F.cross_entropy(fused(idx).flatten(0, 1), idx.flatten())
    assert calls == [{"recompute": recompute}] * fused.config.n_layer
    loss_e = F.cross_entropy(eager(idx).flatten(0, 1), idx.flatten())
    loss_f.backward()
    loss_e.backward()
    torch.testing.assert_close(loss_f, loss_e, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(fused.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
