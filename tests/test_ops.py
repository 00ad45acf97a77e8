"""The operators against the reference's golden vectors, and their algebraic properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mora_jax
from mora_jax import apply_mora, delta_weight, rank_hat

GOLDEN = np.load(__import__("pathlib").Path(__file__).parent / "fixtures" / "mora_ops_public.npz")
CASES = range(int(GOLDEN["n_cases"]))


def golden_case(i):
    g = lambda key: GOLDEN[f"{i}/{key}"]
    k, d, r, t, r_hat, seed = (int(g(n)) for n in ("in_features", "out_features", "r", "mora_type", "r_hat", "seed"))
    rng = np.random.default_rng(seed)
    m = (rng.standard_normal((r_hat, r_hat)) * 0.1).astype(np.float32)
    x = rng.standard_normal((3, k)).astype(np.float32)
    probe = rng.standard_normal((k, 4)).astype(np.float32)
    return dict(k=k, d=d, r=r, t=t, r_hat=r_hat, m=m, x=x, probe=probe, y=g("y"), dk=g("dk"), dk_probe=g("dk_probe"))


def assert_close_to_ref(actual, ref):
    tol = 1e-4 * np.abs(ref).max() + 1e-5
    np.testing.assert_array_less(np.abs(np.asarray(actual) - ref).max(), tol)


@pytest.mark.parametrize("i", CASES)
def test_golden(i):
    c = golden_case(i)
    assert rank_hat(c["k"], c["d"], c["r"], c["t"]) == c["r_hat"]
    kw = dict(in_features=c["k"], out_features=c["d"], mora_type=c["t"])
    assert_close_to_ref(apply_mora(jnp.asarray(c["x"]), jnp.asarray(c["m"]), **kw), c["y"])
    dk = np.asarray(delta_weight(jnp.asarray(c["m"]), **kw))
    assert dk.shape == (c["k"], c["d"]) and dk.dtype == np.float32
    assert_close_to_ref(dk, c["dk"])
    assert_close_to_ref(c["probe"].T @ dk, c["dk_probe"])


def test_rank_hat_examples_from_spec():
    assert rank_hat(4096, 4096, 8, 1) == 256
    assert rank_hat(4096, 11008, 8, 1) == 348
    assert rank_hat(768, 768, 128, 1) == 443
    assert rank_hat(768, 768, 128, 6) == 442


# Shapes that stress every branch: non-dividing, r̂ > k, r̂ > d, r̂ > 2k, single-chunk type 6.
EDGE_SHAPES = [(64, 96, 4), (100, 70, 8), (5, 40, 8), (40, 5, 8), (7, 9, 30), (3, 200, 16), (33, 33, 64), (1, 1, 1)]


def _random(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("k,d,r", EDGE_SHAPES)
@pytest.mark.parametrize("t", [1, 2, 3, 4, 6])
def test_forward_equals_merged_weight(k, d, r, t):
    try:
        r_hat = rank_hat(k, d, r, t)
    except ValueError:  # type 6 with r̂ = 1 cannot exist (needs an even r̂)
        assert t == 6
        return
    m = _random((r_hat, r_hat), 1)
    x = _random((2, 3, k), 2)  # two leading dims
    kw = dict(in_features=k, out_features=d, mora_type=t)
    y = apply_mora(x, m, **kw)
    assert y.shape == (2, 3, d)
    dk = delta_weight(m, **kw)
    np.testing.assert_allclose(np.asarray(x @ dk), np.asarray(y), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k,d,r", EDGE_SHAPES + [(256, 688, 8)])
@pytest.mark.parametrize("t", [1, 6])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_merge_into_equals_kernel_plus_delta_weight(k, d, r, t, dtype):
    """merge_into (type 6: block-by-block into the kernel) == K + ΔK in float32, cast back; jitted
    with the kernel donated; sign -1 undoes it."""
    try:
        r_hat = rank_hat(k, d, r, t)
    except ValueError:
        assert t == 6
        return
    m = _random((r_hat, r_hat), 3)
    kernel = _random((k, d), 4).astype(dtype)
    kw = dict(in_features=k, out_features=d, mora_type=t)
    want = (kernel.astype(jnp.float32) + delta_weight(m, **kw)).astype(dtype)
    merged = jax.jit(lambda kern, m: mora_jax.ops.merge_into(kern, m, **kw), donate_argnums=0)(jnp.array(kernel), m)
    assert merged.dtype == dtype
    np.testing.assert_array_equal(np.asarray(merged, np.float32), np.asarray(want, np.float32))
    back = mora_jax.ops.merge_into(merged, m, sign=-1.0, **kw)
    if dtype == jnp.float32:
        np.testing.assert_allclose(np.asarray(back), np.asarray(kernel), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="kernel has shape"):
        mora_jax.ops.merge_into(kernel.T if k != d else kernel[:, :-1], m, **kw)


def _dense_reference_dk(m, k, d, t):
    """ΔK by pushing the identity through the forward (the slow definition: row j = Δy(e_j))."""
    return apply_mora(jnp.eye(k), m, in_features=k, out_features=d, mora_type=t)


@pytest.mark.parametrize("k,d,r", [(7, 9, 30), (3, 200, 16), (40, 5, 8)])
@pytest.mark.parametrize("t", [1, 2, 3, 4, 6])
def test_delta_weight_matches_definition_when_r_hat_exceeds_k(k, d, r, t):
    r_hat = rank_hat(k, d, r, t)
    assert r_hat > k or r_hat > d
    m = _random((r_hat, r_hat), 3)
    kw = dict(in_features=k, out_features=d, mora_type=t)
    np.testing.assert_allclose(delta_weight(m, **kw), _dense_reference_dk(m, k, d, t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,r_hat", [(768, 443), (2560, 653), (10, 4), (9, 3), (12, 5)])
def test_sliced_chunk_sum_and_tile_equal_the_cpu_forms(k, r_hat):
    # TPU programs run the sliced chunk sum and the concatenated tile, CPU programs the reshape and
    # the broadcast (lax.platform_dependent): same values and gradients, though CPU tests run only one.
    from mora_jax import ops

    x = _random((2, 3, k), 3)
    sliced = lambda x: ops._compress_sum_sliced(x, r_hat)
    reshaped = lambda x: ops._compress_sum_reshaped(x, r_hat)
    np.testing.assert_allclose(np.asarray(sliced(x)), np.asarray(reshaped(x)), rtol=1e-6, atol=1e-5)
    probe = _random((2, 3, r_hat), 4)
    grads = [jax.grad(lambda x, f=f: jnp.sum(f(x) * probe))(x) for f in (sliced, reshaped)]
    np.testing.assert_array_equal(np.asarray(grads[0]), np.asarray(grads[1]))
    u = _random((2, r_hat), 5)
    for d in (r_hat - 1, 2 * r_hat + 3, 4 * r_hat):
        np.testing.assert_array_equal(np.asarray(ops._repeat_to(u, d)), np.asarray(ops._wrap_pad(u, d)))


@pytest.mark.parametrize("d", [5, 12, 13, 29, 36, 61])
def test_tile_by_sum_equals_the_wrap_padded_tile_exactly(d):
    # TPU type-6 programs tile the chunk products as a sum of zero-padded copies: the same values as the
    # broadcast tile, bit for bit, and the same gradient (the sum of the tile's slices, in another order).
    from mora_jax import ops

    u, probe = _random((2, 3, 12), 21), _random((2, 3, d), 22)
    tiled = [ops._tile_by_sum, ops._wrap_pad]
    outs = [jax.vjp(lambda u, f=f: f(u, d), u) for f in tiled]
    np.testing.assert_array_equal(np.asarray(outs[0][0]), np.asarray(outs[1][0]))
    np.testing.assert_allclose(np.asarray(outs[0][1](probe)[0]), np.asarray(outs[1][1](probe)[0]), rtol=1e-6, atol=1e-6)


def test_a_tpu_program_takes_the_sliced_chunk_sum():
    # The form is picked when the program is lowered for a platform, not by the default backend.
    f = lambda x: apply_mora(x, jnp.eye(443), in_features=768, out_features=768, mora_type=1)
    x = jax.ShapeDtypeStruct((4, 768), jnp.float32)
    tpu = jax.jit(f).trace(x).lower(lowering_platforms=("tpu",)).as_text()
    cpu = jax.jit(f).trace(x).lower(lowering_platforms=("cpu",)).as_text()
    assert "reduce" in cpu and "reduce" not in tpu.replace("reduce_precision", "")
    assert "tensor<4x886xf32>" in tpu  # the input padded by a concatenate to two chunks, then sliced


@pytest.mark.parametrize("k,d,r", EDGE_SHAPES + [(768, 768, 128), (2560, 768, 8), (768, 2560, 8), (2560, 768, 128)])
def test_type6_rotated_folded_and_windowed_forms_are_equal(k, d, r):
    # CPU programs multiply the rotated chunks by the one M (the last chunk by the columns that reach the
    # output), TPU programs each chunk's lane-aligned window of x by its zero-padded block R_c·M, other
    # platforms the chunks by the folded blocks in one batched matmul (lax.platform_dependent): the same
    # values and gradients, though CPU tests run only one.
    from mora_jax import ops

    try:
        r_hat = rank_hat(k, d, r, 6)
    except ValueError:
        return
    n = min(-(-k // r_hat), -(-d // r_hat))
    x, m, probe = _random((2, 3, k), 15), _random((r_hat, r_hat), 16) * 0.1, _random((2, 3, d), 17)
    results = []
    for form in (ops._type6_rotated, ops._type6_folded, ops._type6_windowed):
        y, pullback = jax.vjp(lambda x, m, form=form: form(x, m, n, d), x, m)
        results.append((y, *pullback(probe)))
    for other in results[1:]:
        for ours, theirs in zip(results[0], other):
            np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("k,d,r", [(2560, 768, 128), (768, 2560, 128), (768, 768, 8), (172, 64, 8), (64, 32, 8)])
def test_type6_cpu_program_multiplies_only_the_columns_that_reach_the_output(k, d, r):
    """A CPU type-6 forward and backward does 3·2·rows·r̂·W matmul FLOPs, W = min(d, ceil(k/r̂)·r̂) (the
    FLOP model's count): a 2560→768 layer at r=128 (r̂ = 652) multiplies 768 columns, not two chunks'
    1304."""
    from mora_jax import flops
    from mora_jax.plan import hlo

    r_hat = rank_hat(k, d, r, 6)
    loss = lambda x, m, p: jnp.sum(apply_mora(x, m, in_features=k, out_features=d, mora_type=6) * p)
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((64, k), (r_hat, r_hat), (64, d))]
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
    width = flops.mora_columns_used(k, d, r_hat)
    assert hlo.analyze(compiled.as_text()).matmul_flops == 3 * 2 * 64 * r_hat * width
    assert 3 * 64 * flops.adapter_flops_per_token(k, d, "mora", r, 6)[0] == 3 * 2 * 64 * r_hat * width


def test_type6_form_follows_the_lowering_platform():
    f = lambda x, m: apply_mora(x, m, in_features=768, out_features=2560, mora_type=6)
    args = (jax.ShapeDtypeStruct((4, 768), jnp.float32), jax.ShapeDtypeStruct((162, 162), jnp.float32))
    tpu, cpu, gpu = (jax.jit(f).trace(*args).lower(lowering_platforms=(p,)).as_text() for p in ("tpu", "cpu", "cuda"))
    assert "tensor<20x162xf32>" in cpu  # rotated: 4 rows x 5 chunks, one 2-D matmul with m
    assert "batching_dims" in gpu and "batching_dims" not in cpu + tpu  # folded blocks: a dot batched over chunks
    # windowed: each chunk's lane-aligned window of x (chunk 1 = features 162..323 in lanes 128..383), its own
    # matmul; the chunk that wraps (648..809 -> 648..767 and 0..41) as two
    assert "tensor<4x256xf32>" in tpu and tpu.count("stablehlo.dot_general") == 6
    # and pins x, the chunk products and the output to the row-major layout (XLA otherwise relayouts whole
    # activations for the narrow matmuls)
    assert tpu.count("@LayoutConstraint") == 3 and "LayoutConstraint" not in cpu + gpu


def test_wrap_padding_beyond_2k():
    # r̂ > 2k: the reference's x[:pad] append fails; P(x)_j = x_{j mod k} must hold.
    k, d, r = 3, 200, 16
    r_hat = rank_hat(k, d, r, 1)
    assert r_hat > 2 * k
    m = jnp.eye(r_hat)
    x = jnp.asarray([[1.0, 2.0, 3.0]])
    y = apply_mora(x, m, in_features=k, out_features=d, mora_type=1)
    # Sum-of-chunks compression of one chunk is the wrap padding itself; tile decompression repeats it.
    padded = np.array([[1.0, 2.0, 3.0][j % 3] for j in range(r_hat)])
    np.testing.assert_allclose(np.asarray(y)[0], np.tile(padded, -(-d // r_hat))[:d])


@pytest.mark.parametrize("t", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("k,d,r", [(64, 96, 4), (128, 48, 8), (96, 96, 2)])
def test_rank_property(t, k, d, r):
    r_hat = rank_hat(k, d, r, t)
    dk = np.asarray(delta_weight(_random((r_hat, r_hat), 4), in_features=k, out_features=d, mora_type=t), np.float64)
    expected = min(k, d) if t == 6 else min(r_hat, k, d)
    assert np.linalg.matrix_rank(dk) == expected


@pytest.mark.parametrize("t", [1, 2, 3, 4, 6])
def test_zero_m_is_identity(t):
    r_hat = rank_hat(64, 96, 8, t)
    kw = dict(in_features=64, out_features=96, mora_type=t)
    m = jnp.zeros((r_hat, r_hat))
    assert not np.any(np.asarray(apply_mora(_random((4, 64), 5), m, **kw)))
    assert not np.any(np.asarray(delta_weight(m, **kw)))


@pytest.mark.parametrize("t", [1, 2, 3, 4, 6])
def test_jit_equals_eager_and_bf16(t):
    k, d = 100, 70
    r_hat = rank_hat(k, d, 8, t)
    m, x = _random((r_hat, r_hat), 6) * 0.1, _random((5, k), 7)
    kw = dict(in_features=k, out_features=d, mora_type=t)
    eager = apply_mora(x, m, **kw)
    jitted = jax.jit(lambda x, m: apply_mora(x, m, **kw))(x, m)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(lambda m: delta_weight(m, **kw))(m), delta_weight(m, **kw), rtol=1e-6, atol=1e-6)
    y_bf16 = apply_mora(x.astype(jnp.bfloat16), m, **kw)
    assert y_bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y_bf16, np.float32), eager, rtol=0.05, atol=0.05 * float(jnp.abs(eager).max()))


def test_type6_rotation_uses_float32_angles():
    # With bf16 inputs, cos/sin of large chunk angles must not be computed in bf16: compare to f32 path.
    k, d = 4096, 64
    r_hat = rank_hat(k, d, 1, 6)
    m = jnp.eye(r_hat, dtype=jnp.float32)
    x = _random((1, k), 8).astype(jnp.bfloat16)
    kw = dict(in_features=k, out_features=d, mora_type=6)
    y16 = apply_mora(x, m, **kw).astype(jnp.float32)
    y32 = apply_mora(x.astype(jnp.float32), m, **kw)
    np.testing.assert_allclose(y16, y32, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("k,d,r", [(100, 70, 8), (64, 200, 4), (7, 9, 30), (40, 5, 8), (33, 33, 64)])
def test_type6_folded_rotations_equal_rotating_the_activations(k, d, r):
    """Type 6 folds its chunk rotations into m (blocks R_c·M) and is checkpointed: its values and its
    gradients for x and m equal the reference's order, rotating the input chunks in float32 and
    multiplying them by m, differentiated by autodiff."""
    from mora_jax import ops

    r_hat = rank_hat(k, d, r, 6)
    n = min(-(-k // r_hat), -(-d // r_hat))

    def rotate_then_multiply(x, m):
        chunks = ops._wrap_pad(x, n * r_hat).reshape(*x.shape[:-1], n, r_hat).astype(jnp.float32)
        cos, sin = ops.rope_cos_sin(r_hat, n)
        half = r_hat // 2
        rotated = chunks * cos + jnp.concatenate([-chunks[..., half:], chunks[..., :half]], axis=-1) * sin
        u = rotated.astype(x.dtype) @ m.astype(x.dtype)
        return ops._decompress_tile(u.reshape(*x.shape[:-1], n * r_hat), d)

    def folded(x, m):
        return apply_mora(x, m, in_features=k, out_features=d, mora_type=6)

    x, m, probe = _random((2, 3, k), 12), _random((r_hat, r_hat), 13) * 0.1, _random((2, 3, d), 14)
    np.testing.assert_allclose(folded(x, m), rotate_then_multiply(x, m), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda x, m: jnp.sum(f(x, m) * probe)
    for ours, reference in zip(jax.grad(loss(folded), (0, 1))(x, m), jax.grad(loss(rotate_then_multiply), (0, 1))(x, m)):
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5)


def test_lora_ops():
    a, b, x = _random((16, 4), 9), _random((4, 8), 10), _random((3, 16), 11)
    scale = mora_jax.ops.lora_scale(4, 8.0)
    assert scale == 2.0 and mora_jax.ops.lora_scale(4, 8.0, rslora=True) == 4.0
    np.testing.assert_allclose(x @ mora_jax.lora_delta_weight(a, b, scale=scale), mora_jax.apply_lora(x, a, b, scale=scale), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lora_custom_gradient_matches_autodiff(dtype):
    """apply_lora's hand-written VJP gives autodiff's gradients for x, a and b (3-d batch input,
    float32 trainables under a bfloat16 activation too)."""
    a, b = _random((16, 4), 12), _random((4, 8), 13)
    x, dy = _random((2, 3, 16), 14).astype(dtype), _random((2, 3, 8), 15).astype(dtype)
    scale = 2.0

    def reference(x, a, b):
        return ((x @ a.astype(x.dtype)) @ b.astype(x.dtype)) * jnp.asarray(scale, x.dtype)

    def loss(fn):
        return lambda x, a, b: jnp.sum((fn(x, a, b) * dy).astype(jnp.float32))

    got = jax.grad(loss(lambda x, a, b: mora_jax.apply_lora(x, a, b, scale=scale)), argnums=(0, 1, 2))(x, a, b)
    want = jax.grad(loss(reference), argnums=(0, 1, 2))(x, a, b)
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    for g, w, ref in zip(got, want, (x, a, b)):
        assert g.dtype == ref.dtype and g.shape == ref.shape
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol, atol=tol)


def test_lora_gradient_materialises_no_transposed_activations():
    """The reason for apply_lora's custom VJP: under autodiff XLA:CPU writes ∂y (and x) transposed,
    (d, B·T), before the skinny ∂b / ∂a dots; the hand-written gradient needs no such copy."""
    import re

    B, T, k, d, r = 2, 64, 96, 160, 4
    x, w = jnp.ones((B, T, k)), jnp.ones((k, d))
    a, b = jnp.ones((k, r)), jnp.ones((r, d))

    def compiled_grad(delta):
        def loss(x, a, b):
            h = jnp.tanh(x @ w + delta(x, a, b))
            return jnp.sum(h * h)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, a, b).compile().as_text()

    transposed = re.compile(rf"= f32\[(?:{d},{B * T}|{k},{B * T}|{d},{B},{T}|{k},{B},{T})\]")
    autodiff = compiled_grad(lambda x, a, b: ((x @ a) @ b) * 2.0)
    ours = compiled_grad(lambda x, a, b: mora_jax.apply_lora(x, a, b, scale=2.0))
    assert transposed.search(autodiff)  # the pattern this test looks for does occur
    assert not transposed.search(ours)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: rank_hat(64, 64, 0, 1), "positive int"),
        (lambda: rank_hat(64, 64, -3, 1), "positive int"),
        (lambda: rank_hat(64, 64, 8, 5), "unknown mora_type 5"),
        (lambda: rank_hat(0, 64, 8, 1), "in_features must be a positive int"),
        (lambda: apply_mora(jnp.ones((2, 63)), jnp.ones((4, 4)), in_features=64, out_features=8, mora_type=1), "in_features=64"),
        (lambda: apply_mora(jnp.ones((2, 64)), jnp.ones((4, 5)), in_features=64, out_features=8, mora_type=1), "square"),
        (lambda: delta_weight(jnp.ones((5, 5)), in_features=64, out_features=8, mora_type=6), "even"),
    ],
)
def test_operator_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
