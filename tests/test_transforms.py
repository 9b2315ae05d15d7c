"""Properties of qcompile.transforms (pure float64 math, no graphs).

* Hadamard matrices are orthonormal (incl. Paley orders 12/20/36 and 576, 1536);
* greedy block rotations, block-diagonal rotations and DuQuant's T are orthogonal;
* the greedy rotation never increases a block's max |x| on its calibration sample;
* zigzag is a permutation and evens out block maxima on adversarial inputs;
* folding is exact: (X T)(W T)^T == X W^T, and (X / s)(W * s)^T == X W^T;
* DuQuant lowers max |x| and the int4 per-token fake-quant error on a sample with
  planted massive outliers.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.transforms import (
    apply_to_activation,
    block_diagonal_rotation,
    duquant_transform,
    fold_into_weight,
    greedy_block_rotation,
    hadamard,
    hadamard_factors,
    hadamard_or_random,
    permutation_matrix,
    random_orthogonal,
    smooth_activation,
    smooth_scales,
    smooth_weight,
    uniform_first_row_matrix,
    zigzag_permutation,
)

F64 = torch.float64
SETTINGS = settings(max_examples=20, deadline=None)
pytestmark = pytest.mark.usefixtures("one_thread")


def assert_orthogonal(m: torch.Tensor, atol: float = 1e-10) -> None:
    eye = torch.eye(m.shape[0], dtype=F64)
    assert m.dtype == F64
    assert torch.allclose(m @ m.T, eye, atol=atol, rtol=0)
    assert torch.allclose(m.T @ m, eye, atol=atol, rtol=0)


def sample(seed: int, rows: int, k: int, outliers: int = 0, scale: float = 1000.0):
    """Gaussian sample with ``outliers`` planted massive values (channel, token pairs)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, dtype=F64, generator=gen)
    for _ in range(outliers):
        r = int(torch.randint(rows, (1,), generator=gen))
        c = int(torch.randint(k, (1,), generator=gen))
        x[r, c] = scale * (1 + float(torch.rand(1, generator=gen, dtype=F64)))
    return x


def fake_quant_mse(x: torch.Tensor, bits: int = 4) -> float:
    """MSE of symmetric per-token (row) absmax fake quantization."""
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
    q = (x / scale).round().clamp(-qmax, qmax) * scale
    return float(((q - x) ** 2).mean())


# --------------------------------------------------------------------------- Hadamard


@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 16, 20, 24, 28, 36, 48, 64, 576, 1536])
def test_hadamard_orthonormal(n):
    h = hadamard(n)
    assert h.shape == (n, n)
    assert_orthogonal(h)
    assert torch.allclose(h.abs(), torch.full_like(h, 1 / math.sqrt(n)), atol=1e-15, rtol=0)
    assert torch.allclose(h[0], torch.full((n,), 1 / math.sqrt(n), dtype=F64), atol=1e-15)


def test_hadamard_factorisations():
    assert hadamard_factors(576) == (36, 16)
    assert hadamard_factors(1536) == (12, 128)
    assert hadamard_factors(12) == (12,)
    assert hadamard_factors(20) == (20,)
    assert hadamard_factors(36) == (36,)
    assert hadamard_factors(128) == (128,)
    for n in (3, 6, 10, 92):
        assert hadamard_factors(n) is None
        with pytest.raises(ValueError):
            hadamard(n)


@pytest.mark.parametrize("n", [576, 1536, 64])
def test_hadamard_or_random_uses_hadamard(n):
    m, kind = hadamard_or_random(n)
    assert kind == "hadamard"
    assert torch.equal(m, hadamard(n))


@SETTINGS
@given(n=st.sampled_from([3, 5, 6, 10, 92, 100]), seed=st.integers(0, 2**31 - 1))
def test_hadamard_or_random_falls_back(n, seed):
    m, kind = hadamard_or_random(n, seed)
    assert kind == "random-orthogonal"
    assert_orthogonal(m)
    assert torch.equal(m, random_orthogonal(n, seed))  # deterministic per seed


@pytest.mark.parametrize("b", [1, 2, 3, 5, 7, 12, 24, 100, 128])
def test_uniform_first_row_matrix(b):
    m = uniform_first_row_matrix(b)
    assert_orthogonal(m)
    assert torch.allclose(m[0], torch.full((b,), 1 / math.sqrt(b), dtype=F64), atol=1e-14)


# --------------------------------------------------------------------------- smoothing


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.integers(1, 48),
    n=st.integers(1, 24),
    alpha=st.floats(0.0, 1.0),
    shared=st.integers(1, 3),
)
def test_smoothing_exact(seed, k, n, alpha, shared):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, k, dtype=F64, generator=gen) * torch.rand(k, dtype=F64, generator=gen) * 50
    x[:, 0] = 0.0  # a dead channel: must not produce inf/nan
    ws = [torch.randn(n, k, dtype=F64, generator=gen) for _ in range(shared)]
    s = smooth_scales(x.abs().amax(0), ws if shared > 1 else ws[0], alpha)
    assert s.shape == (k,) and s.dtype == F64
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
    xs = smooth_activation(x, s)
    for w in ws:
        ref = x @ w.T
        got = xs @ smooth_weight(w, s).T
        assert float((got - ref).norm()) <= 1e-12 * max(float(ref.norm()), 1e-300)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 32))
def test_smoothing_balances_at_half(seed, k):
    """alpha = 0.5: after smoothing, max|X'_j| == max|W'_j| (both sqrt(max|X_j| max|W_j|))."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, k, dtype=F64, generator=gen) * 10 ** torch.rand(k, dtype=F64, generator=gen)
    w = torch.randn(5, k, dtype=F64, generator=gen)
    s = smooth_scales(x.abs().amax(0), w, 0.5)
    assert torch.allclose((x / s).abs().amax(0), (w * s).abs().amax(0), rtol=1e-12)


# --------------------------------------------------------------------------- DuQuant parts


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    b=st.sampled_from([1, 2, 3, 5, 8, 12, 16, 20, 32]),
    rows=st.integers(1, 24),
    outliers=st.integers(0, 4),
    steps=st.integers(0, 10),
)
def test_greedy_rotation_orthogonal_and_never_increases_max(seed, b, rows, outliers, steps):
    x = sample(seed, rows, b, outliers, scale=float(10 ** (seed % 4)))
    r = greedy_block_rotation(x, steps, seed=seed)
    assert r.shape == (b, b)
    assert_orthogonal(r)
    assert float((x @ r).abs().max()) <= float(x.abs().max())
    # The absmax form [B] is accepted too, with the same guarantee on its one-row proxy.
    a = x.abs().amax(0)
    ra = greedy_block_rotation(a, steps, seed=seed)
    assert_orthogonal(ra)
    assert float((a[None] @ ra).abs().max()) <= float(a.max())


def test_greedy_rotation_spreads_a_single_outlier():
    x = torch.zeros(1, 64, dtype=F64)
    x[0, 17] = 1000.0
    r = greedy_block_rotation(x, steps=1)
    assert torch.allclose((x @ r).abs(), torch.full((1, 64), 1000.0 / 8, dtype=F64), rtol=1e-12)


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.integers(1, 70),
    block=st.sampled_from([1, 4, 8, 12, 16, 32]),
    outliers=st.integers(0, 4),
)
def test_block_diagonal_rotation(seed, k, block, outliers):
    x = sample(seed, 12, k, outliers)
    r, note = block_diagonal_rotation(x, block, steps=4, seed=seed)
    assert_orthogonal(r)
    assert (note is None) == (k % block == 0)
    blk = torch.arange(k) // block
    off_block = blk[:, None] != blk[None, :]
    assert bool((r[off_block] == 0).all())
    xr = x @ r
    for b in range(int(blk.max()) + 1):  # no block's max increases
        sel = blk == b
        assert float(xr[:, sel].abs().max()) <= float(x[:, sel].abs().max())


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.integers(1, 100),
    block=st.integers(1, 40),
)
def test_zigzag_is_permutation(seed, k, block):
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(k, dtype=F64, generator=gen) * 10 ** torch.randint(0, 4, (k,), generator=gen)
    perm = zigzag_permutation(a, block)
    assert perm.dtype == torch.int64
    assert torch.equal(torch.sort(perm).values, torch.arange(k))
    x = torch.randn(3, k, dtype=F64, generator=gen)
    assert torch.equal(x @ permutation_matrix(perm), x[:, perm])
    # The nb largest channels land in distinct blocks.
    nb = -(-k // block)
    top = set(torch.sort(a, descending=True, stable=True).indices[:nb].tolist())
    pos = torch.empty(k, dtype=torch.int64)
    pos[perm] = torch.arange(k)
    assert len({int(pos[c]) // block for c in top}) == len(top)


def block_maxima(a: torch.Tensor, block: int) -> torch.Tensor:
    return torch.stack([a[i : i + block].max() for i in range(0, a.numel(), block)])


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    nb=st.integers(2, 16),
    extra=st.integers(0, 16),
    last=st.integers(1, 32),
    big=st.floats(10.0, 1e4),
)
def test_zigzag_evens_out_adversarial_block_maxima(seed, nb, extra, last, big):
    """All big channels (magnitudes in [big, 1.5 big]) sit in the first block."""
    block = nb + extra
    last = min(last, block)
    k = block * (nb - 1) + last
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(k, dtype=F64, generator=gen)  # small channels in [0, 1)
    a[:block] = big * (1 + 0.5 * torch.rand(block, dtype=F64, generator=gen))
    perm = zigzag_permutation(a, block)
    before = block_maxima(a, block)
    after = block_maxima(a[perm], block)
    assert float(after.var()) < float(before.var())
    assert float(after.min()) >= big  # every block now holds one big channel
    assert float(after.max()) == float(before.max())


# --------------------------------------------------------------------------- DuQuant


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.sampled_from([8, 12, 24, 40, 64, 72]),
    block=st.sampled_from([4, 8, 12, 16, 32]),
    n=st.integers(1, 16),
    outliers=st.integers(0, 3),
    permute=st.booleans(),
    second=st.booleans(),
    gate_bits=st.sampled_from([None, 4, 8]),
)
def test_duquant_orthogonal_and_exact(seed, k, block, n, outliers, permute, second, gate_bits):
    x = sample(seed, 16, k, outliers)
    w = sample(seed + 1, n, k)
    t, info = duquant_transform(
        x,
        block_size=block,
        steps=4,
        permute=permute,
        second_rotation=second,
        seed=seed,
        gate_bits=gate_bits,
    )
    assert t.shape == (k, k)
    assert_orthogonal(t)
    ref = x @ w.T
    got = apply_to_activation(x, t) @ fold_into_weight(w, t).T
    assert float((got - ref).norm()) <= 1e-10 * float(ref.norm())
    assert info["max_after"] <= info["max_before"] * (1 + 1e-12)
    assert info["max_after"] <= info["max_after_r1"] * (1 + 1e-12)  # one ulp seen
    assert info["max_after_r1"] <= info["max_before"]
    assert torch.equal(info["absmax_before"], x.abs().amax(0))
    assert torch.allclose(info["absmax_after"], (x @ t).abs().amax(0), rtol=0, atol=1e-12)
    assert (info["block_note"] is None) == (k % block == 0)
    stage = info["second_stage"]
    if not second:
        assert stage == "off"
    elif gate_bits is None:
        assert stage == "kept"  # the paper's pipeline: no gate
    else:
        assert stage in ("kept", "rejected")
    assert (info["perm"] is not None) == (permute and stage != "rejected")
    p = permutation_matrix(info["perm"]) if info["perm"] is not None else torch.eye(k, dtype=F64)
    assert torch.allclose(info["R1"] @ p @ info["R2"], t, atol=1e-12, rtol=0)
    if stage == "rejected":
        assert torch.equal(t, info["R1"])


def test_fold_casts_back_and_does_not_touch_input():
    w = torch.randn(6, 24)
    w0 = w.clone()
    t = hadamard(24)
    out = fold_into_weight(w, t)
    assert out.dtype == torch.float32
    assert torch.equal(w, w0)
    assert torch.allclose(out.double(), w.double() @ t, atol=1e-6)
    x = torch.randn(2, 3, 24, dtype=torch.bfloat16)
    assert apply_to_activation(x, t).dtype == torch.bfloat16


def massive_sample(seed: int, k: int, rows: int = 64, systematic: bool = True):
    """LLM-like activations: Gaussian, 1-3 systematic outlier channels (20-100x in
    every token) if ``systematic``, and 1-4 tokens with a massive +-1000 entry in one
    channel (DuQuant's massive outliers)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, dtype=F64, generator=gen)
    chans = torch.randperm(k, generator=gen)[:4].tolist()
    if systematic:
        for c in chans[: int(torch.randint(1, 4, (1,), generator=gen))]:
            x[:, c] *= 20 + 80 * float(torch.rand(1, generator=gen, dtype=F64))
    toks = torch.randperm(rows, generator=gen)[: int(torch.randint(1, 5, (1,), generator=gen))]
    x[toks, chans[-1]] = 1000.0 * torch.sign(torch.randn(len(toks), dtype=F64, generator=gen))
    return x


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.sampled_from([256, 576]),
    systematic=st.booleans(),
)
def test_duquant_tames_planted_massive_outliers(seed, k, systematic):
    x = massive_sample(seed, k, systematic=systematic)
    t, info = duquant_transform(x, block_size=128, steps=8, seed=seed)
    assert_orthogonal(t)
    # The massive entry spreads over its block (128, or 64 for 576's last block):
    # at least ~5x smaller max.
    assert info["max_after"] < info["max_before"] / 5
    if systematic:  # int4 per-token error falls (the systematic channels are spread)
        assert fake_quant_mse(x @ t) < 0.9 * fake_quant_mse(x)


def test_lone_massive_spike_is_not_helped_by_rotation_alone():
    """Documented limit: a token that is one +-1000 spike plus N(0,1) noise loses only
    its noise under per-token absmax int4 (the spike is exact); spreading the spike
    over 128 channels makes every entry coarse, so the token's MSE grows with any
    rotation (DuQuant's or a full Hadamard). Smoothing first is the remedy (below)."""
    x = massive_sample(0, 256, systematic=False)
    t, info = duquant_transform(x, block_size=128, steps=8)
    assert info["max_after"] < info["max_before"] / 5
    assert fake_quant_mse(x @ t) > fake_quant_mse(x)
    assert fake_quant_mse(x @ hadamard(256)) > fake_quant_mse(x)


def w4a4_rel_error(x: torch.Tensor, w: torch.Tensor) -> float:
    """Relative output error with int4 per-token X and int4 per-output-channel W."""
    ref = x @ w.T

    def fq(m):
        scale = m.abs().amax(dim=1, keepdim=True).clamp_min(1e-300) / 7
        return (m / scale).round().clamp(-7, 7) * scale

    return float((fq(x) @ fq(w).T - ref).norm() / ref.norm())


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.sampled_from([256, 576]),
    every_token=st.booleans(),
)
def test_smoothing_then_duquant_cuts_w4a4_error_on_massive_outliers(seed, k, every_token):
    """DuQuant's full pipeline: X' = (X / s) T, W' = (W * s) T."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, k, dtype=F64, generator=gen)
    c = int(torch.randint(k, (1,), generator=gen))
    if every_token:
        x[:, c] *= 1000.0
    else:
        x[torch.randperm(64, generator=gen)[:4], c] = 1000.0
    w = torch.randn(96, k, dtype=F64, generator=gen) / math.sqrt(k)
    s = smooth_scales(x.abs().amax(0), w, alpha=0.5)
    xs, ws = smooth_activation(x, s), smooth_weight(w, s)
    t, _ = duquant_transform(xs, block_size=128, steps=8, seed=seed)
    xt, wt = apply_to_activation(xs, t), fold_into_weight(ws, t)
    assert float((xt @ wt.T - x @ w.T).norm()) <= 1e-10 * float((x @ w.T).norm())
    assert w4a4_rel_error(xt, wt) < 0.5 * w4a4_rel_error(x, w)
