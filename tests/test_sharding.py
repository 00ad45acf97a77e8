"""Sharding over a device mesh on 8 fake CPU devices (tests/conftest.py sets the device count).

Sharded forward pass, loss, gradients and train steps must equal single-device results (float32
tolerance) on asymmetric meshes (data 2 × tensor 4, fsdp 4 × tensor 2); the compiled step must
use the intended PartitionSpecs; scanned layers, ReMoRA merges, sharded init and sharded HF
loading must work. Compilation dominates the run time, so each jitted function is compiled once
per mesh and shared through module fixtures.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mora_jax as mj
from mora_jax import mesh as mesh_lib
from mora_jax import sharding as shd
from mora_jax import training
from mora_jax.models.config import LLAMA_CONFIGS
from mora_jax.models.llama import LlamaForCausalLM, abstract_params
from mora_jax.models.params import stack_layers, unstack_layers
from mora_jax.steps import build_steps

# The tiny test model with 8 query / 4 key-value heads, so heads, kv heads, MLP (172 = 4·43),
# hidden size (64) and vocabulary (256) all divide the 4-way mesh axes.
CFG = dataclasses.replace(LLAMA_CONFIGS["tiny"], num_attention_heads=8, num_key_value_heads=4)
MODEL = LlamaForCausalLM(CFG)
ADAPTER_CONFIG = mj.MoRAConfig(r=4, mora_type=1, unfreeze=mj.LLAMA_FULLY_TRAINED)
TX = mj.optim.adamw(3e-3)
SCHEDULE = lambda step: 3e-3  # noqa: E731
STEP_CONFIG = training.StepConfig(clip_norm=1.0)
N_STEPS = 3

MESHES = {
    "data2_tensor4": mesh_lib.MeshConfig(("data", "tensor"), (2, 4)),
    "fsdp4_tensor2": mesh_lib.MeshConfig(("fsdp", "tensor"), (4, 2)),
}


def _batch(seed=0, b=8, t=16):
    ids = np.random.default_rng(seed).integers(0, CFG.vocab_size, (b, t)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[:2, 12:] = 0  # uneven token counts across batch shards
    return {"input_ids": ids, "loss_mask": mask}


def _perturbed(state):
    """Non-zero adapters (MoRA's m starts at 0), so the adapter path of the forward pass matters."""
    leaves, treedef = jax.tree_util.tree_flatten(state.trainables)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    leaves = [x + 0.02 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return state.replace(trainables=jax.tree_util.tree_unflatten(treedef, leaves))


def _init_state(key, model=MODEL):
    """The whole initialisation as one pure function of a key (what init_sharded_state jits)."""
    params = model.init(key, jnp.zeros((1, 8), jnp.int32))["params"]
    layout = mj.dense_layout(model, jnp.zeros((1, 8), jnp.int32)) if model.config.scan_layers else None
    adapters = mj.init_adapters(params, ADAPTER_CONFIG, jax.random.fold_in(key, 1), layout=layout)
    return training.create_train_state(params, adapters, ADAPTER_CONFIG, TX, jax.random.fold_in(key, 2))


def _forward_loss_grads(state, batch):
    """Logits, mean loss and its gradients w.r.t. the trainables (adapters and unfrozen params),
    from one forward and backward pass."""
    def loss_fn(trainables):
        logits = training.logits_fn(MODEL, state.replace(trainables=trainables), batch["input_ids"])
        loss_sum, count = training.next_token_loss(logits, batch)
        return loss_sum / count, logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainables)
    return logits, loss, grads


def _assert_trees_close(actual, expected, rtol, atol):
    jax.tree_util.tree_map(lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol),
                           actual, expected)


@pytest.fixture(scope="module")
def reference():
    """Single-device results: initial state, forward/loss/grads, losses and state after N_STEPS steps."""
    state0 = jax.jit(_init_state)(jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    forward = jax.jit(_forward_loss_grads)(_perturbed(state0), batch)
    step = jax.jit(lambda s, b: training.train_step(s, b, model=MODEL, tx=TX, schedule=SCHEDULE, step_config=STEP_CONFIG))
    state, losses = state0, []
    for i in range(N_STEPS):
        state, metrics = step(state, {k: jnp.asarray(v) for k, v in _batch(i).items()})
        losses.append(float(metrics["loss"]))
    return {"state0": state0, "forward": forward, "losses": losses, "state": state}


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_forward_loss_and_adapter_grads_match_single_device(reference, mesh_name):
    mesh = mesh_lib.make_mesh(MESHES[mesh_name])
    state = _perturbed(reference["state0"])
    state_sh = shd.state_shardings(state, mesh)
    state = shd.place(state, state_sh)
    batch = shd.shard_batch(_batch(), mesh)
    with shd.use_mesh(mesh):
        fn = jax.jit(_forward_loss_grads, in_shardings=(state_sh, shd.batch_sharding(mesh)))
        lowered = fn.lower(state, batch)
        logits, loss, grads = fn(state, batch)
    # the model's logical activation annotations became sharding constraints on this mesh
    text = lowered.as_text()
    assert "sharding_constraint" in text or "@Sharding" in text
    ref_logits, ref_loss, ref_grads = reference["forward"]
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    _assert_trees_close(grads["adapters"], ref_grads["adapters"], rtol=1e-4, atol=1e-6)
    _assert_trees_close(grads["params"], ref_grads["params"], rtol=1e-4, atol=1e-6)
    # gradients come back sharded like the trainables they belong to
    q_grad = grads["adapters"]["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].m
    assert q_grad.shape == ref_grads["adapters"]["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].m.shape


def _spec_of(sharding_tree, *path):
    node = sharding_tree
    for key in path:
        node = node[key] if isinstance(node, dict) else getattr(node, key)
    return node.spec


def test_train_steps_match_unsharded_and_use_intended_specs(reference):
    mesh = mesh_lib.make_mesh(MESHES["fsdp4_tensor2"])
    steps = build_steps(MODEL, TX, SCHEDULE, STEP_CONFIG, mesh=mesh)
    state = steps.place(reference["state0"])
    state_sh = steps.state_shardings(state)

    # the compiled step's parameter shardings are the intended ones; the frozen weights are an
    # input of their own, neither donated nor returned
    compiled = steps.lower_train(state, steps.shard_batch(_batch(0))).compile()
    (in_frozen, in_rest, in_batch), _ = compiled.input_shardings
    out_rest, out_metrics = compiled.output_shardings
    assert out_rest.frozen is None
    in_state, out_state = in_rest.replace(frozen=in_frozen), out_rest.replace(frozen=in_frozen)
    layer = ("model", "layers_0")
    expected = {
        ("frozen", *layer, "self_attn", "q_proj", "kernel"): P("fsdp", "tensor"),
        ("frozen", *layer, "self_attn", "o_proj", "kernel"): P("tensor", "fsdp"),
        ("frozen", *layer, "mlp", "down_proj", "kernel"): P("tensor", "fsdp"),
        ("frozen", *layer, "mlp", "gate_proj", "kernel"): P("fsdp", "tensor"),
    }
    trainable = {
        ("model", "embed_tokens", "embedding"): P("tensor", "fsdp"),
        ("lm_head", "kernel"): P("fsdp", "tensor"),
        ("model", "norm", "weight"): P(None),
        ("model", "layers_1", "input_layernorm", "weight"): P(None),
    }
    for shardings in (in_state, out_state, state_sh):
        for path, spec in expected.items():
            got = _spec_of(shardings, *path)
            assert NamedSharding(mesh, got).is_equivalent_to(NamedSharding(mesh, spec), 2), (path, got, spec)
        for path, spec in trainable.items():
            got = _spec_of(shardings.trainables["params"], *path)
            assert NamedSharding(mesh, got).is_equivalent_to(NamedSharding(mesh, spec), len(spec)), (path, got)
            # Adam's moments follow the parameter; their step count is replicated
            adam = shardings.opt_state["params"].inner_state[1][0]
            assert _spec_of(adam.mu, *path) == _spec_of(shardings.trainables["params"], *path)
            assert adam.count.spec == P()
        m_sharding = shardings.trainables["adapters"]["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].m
        assert m_sharding.is_equivalent_to(NamedSharding(mesh, P()), 2)  # MoRA's m is replicated
        # ... and its Adam moments are sharded over fsdp where r̂ divides (ZeRO-1): k_proj's r̂ = 20
        # does, q_proj's r̂ = 23 does not
        adam = shardings.opt_state["adapters"].inner_state[1][0]
        attention = ("model", "layers_0", "self_attn")
        assert _spec_of(shardings.trainables["adapters"], *attention, "k_proj", "kernel", "m") in (P(), P(None, None))
        assert _spec_of(adam.nu, *attention, "k_proj", "kernel", "m") == P("fsdp", None)
        assert _spec_of(adam.mu, *attention, "q_proj", "kernel", "m") in (P(), P(None, None))
    assert in_batch["input_ids"].is_equivalent_to(NamedSharding(mesh, P("fsdp")), 2)
    assert all(s.is_equivalent_to(NamedSharding(mesh, P()), 0) for s in jax.tree_util.tree_leaves(out_metrics))

    losses = []
    frozen_before = state.frozen
    for i in range(N_STEPS):
        state, metrics = steps.train(state, steps.shard_batch(_batch(i)))
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, reference["losses"], rtol=1e-5)
    _assert_trees_close(state.trainables, reference["state"].trainables, rtol=1e-4, atol=2e-5)
    assert state.frozen is frozen_before and not steps.owns_frozen(state)
    # the state stays in its layout across steps (donated, updated in place)
    assert state.frozen["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert state.trainables["params"]["model"]["embed_tokens"]["embedding"].sharding.spec == P("tensor", "fsdp")
    assert int(state.step) == N_STEPS
    # place() copied: donating the placed state left the single-device original intact
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(reference["state0"]))


def test_init_sharded_state_matches_unsharded_init(reference):
    mesh = mesh_lib.make_mesh(MESHES["data2_tensor4"])
    state, state_sh = shd.init_sharded_state(_init_state, jax.random.key(0), mesh=mesh)
    q = state.frozen["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == P(None, "tensor")  # no fsdp axis on this mesh: only tensor-parallel
    assert q.addressable_shards[0].data.shape == (64, 64 // 4)
    assert state.trainables["params"]["model"]["embed_tokens"]["embedding"].sharding.spec == P("tensor", None)
    assert state_sh.step.spec == P() and state.rng.sharding.spec == P()
    _assert_trees_close(state.frozen, reference["state0"].frozen, rtol=1e-6, atol=1e-7)
    _assert_trees_close(state.trainables, reference["state0"].trainables, rtol=1e-6, atol=1e-7)


def test_scan_layers_sharded_steps_match_unrolled(reference):
    """The reference's weights stacked for an nn.scan model: same losses, stacked specs."""
    model = LlamaForCausalLM(dataclasses.replace(CFG, scan_layers=True))
    mesh = mesh_lib.make_mesh(MESHES["data2_tensor4"])
    state0 = reference["state0"]
    state = training.create_train_state(stack_layers(state0.params()), stack_layers(state0.adapters),
                                        ADAPTER_CONFIG, TX, state0.rng)
    state_sh = shd.state_shardings(jax.eval_shape(lambda: state), mesh)
    specs = shd.specs_of(state_sh)
    layers = specs.frozen["model"]["layers"]
    assert layers["self_attn"]["q_proj"]["kernel"] == P(None, None, "tensor")  # leading layer axis unsharded
    assert layers["mlp"]["down_proj"]["kernel"] == P(None, "tensor", None)
    assert specs.trainables["adapters"]["model"]["layers"]["self_attn"]["k_proj"]["kernel"].m == P(None, None, None)
    assert specs.trainables["params"]["model"]["layers"]["input_layernorm"]["weight"] == P(None, None)
    steps = build_steps(model, TX, SCHEDULE, STEP_CONFIG, mesh=mesh)
    state = steps.place(state)
    losses = []
    for i in range(N_STEPS):
        state, metrics = steps.train(state, steps.shard_batch(_batch(i)))
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, reference["losses"], rtol=1e-5)
    _assert_trees_close(unstack_layers(state.trainables["adapters"]), reference["state"].trainables["adapters"],
                        rtol=1e-4, atol=2e-5)
    assert state.frozen["model"]["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec == P(None, None, "tensor")


def test_remora_merge_under_jit_keeps_shardings_and_function(reference):
    mesh = mesh_lib.make_mesh(MESHES["fsdp4_tensor2"])
    state = _perturbed(reference["state0"])  # non-zero adapters: the merge changes the kernels
    steps = build_steps(MODEL, TX, SCHEDULE, STEP_CONFIG, mesh=mesh)
    state = steps.place(state)
    borrowed = state.frozen
    kernel_before = np.asarray(state.frozen["model"]["layers_1"]["mlp"]["up_proj"]["kernel"])
    batch = steps.shard_batch(_batch(5))
    before = steps.eval(state, batch)
    state = steps.merge(state, next_type=2)  # MoRA type 1 -> 2: the adapters' static metadata changes
    after = steps.eval(state, batch)  # the eval step re-specialises to the new structure
    # the first merge kept the weights it was handed; later merges own theirs and donate them
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(borrowed)) and steps.owns_frozen(state)
    merged_once = state.frozen
    state = steps.merge(_perturbed(state), next_type=3)
    assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(merged_once["model"]["layers_1"]["mlp"]))
    state = steps.merge(state, next_type=2)  # back to the structure checked below
    np.testing.assert_allclose(float(after["loss_sum"]), float(before["loss_sum"]), rtol=1e-5)
    adapter = state.adapters["model"]["layers_1"]["mlp"]["up_proj"]["kernel"]
    assert adapter.mora_type == 2 and not np.any(np.asarray(adapter.m))
    assert adapter.m.sharding.spec == P(None, None)
    kernel = state.frozen["model"]["layers_1"]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding.spec == P("fsdp", "tensor")
    assert not np.allclose(np.asarray(kernel), kernel_before)
    assert int(state.opt_state["adapters"].count) == 0
    assert state.opt_state["adapters"].inner_state[1][0].mu["model"]["layers_1"]["mlp"]["up_proj"]["kernel"].m.sharding.spec == P(None, None)


# ---- Rules without compiling ----------------------------------------------------------------------


def test_indivisible_dims_fall_back_to_replicated_and_lora_follows_the_kernel():
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(("data", "fsdp", "tensor"), (1, 2, 4)))
    cfg = dataclasses.replace(LLAMA_CONFIGS["tiny"], intermediate_size=170)  # 170 = 2·85: not divisible by 4
    params = abstract_params(cfg)
    specs = shd.tree_specs(params, mesh)
    layer = specs["model"]["layers_0"]
    assert layer["mlp"]["gate_proj"]["kernel"] == P("fsdp", None)  # mlp 170 % 4: replicated there
    assert layer["mlp"]["down_proj"]["kernel"] == P(None, "fsdp")
    assert layer["self_attn"]["k_proj"]["kernel"] == P("fsdp", "tensor")  # 2 kv heads × 16 = 32 divides
    # batch over data × fsdp: a dimension divisible by data only keeps the prefix that divides
    assert shd.spec_from_logical((6, 5), ("batch", "embed"), mesh_lib.make_mesh(mesh_lib.MeshConfig(("data", "fsdp", "tensor"), (2, 4, 1)))) == P("data", None)
    assert shd.spec_from_logical((4, 64, 64), ("embed", "mlp"), mesh) == P(None, "fsdp", "tensor")

    lora = jax.eval_shape(lambda: mj.init_adapters(params, mj.LoRAConfig(r=4), jax.random.key(1)))
    lora_specs = shd.tree_specs(lora, mesh)
    q = lora_specs["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert (q.a, q.b) == (P("fsdp", None), P(None, "tensor"))  # a (k, r): k like the kernel's in dim
    down = lora_specs["model"]["layers_1"]["mlp"]["down_proj"]["kernel"]
    assert (down.a, down.b) == (P(None, None), P(None, "fsdp"))  # k = 170 not divisible by 4
    # a rule for the adapter path overrides the default (here: shard MoRA's m)
    rules = shd.DEFAULT_RULES.with_param_rules((r".*/q_proj/kernel/m", ("heads", None)))
    mora = jax.eval_shape(lambda: mj.init_adapters(params, mj.MoRAConfig(r=8, mora_type=1), jax.random.key(0)))
    mora_specs = shd.tree_specs(mora, mesh, rules)
    assert mora_specs["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].m == P("tensor", None)
    assert mora_specs["model"]["layers_0"]["self_attn"]["v_proj"]["kernel"].m == P(None, None)
    # unmatched parameters are replicated; a rule with more axes than dims is an error
    assert shd.param_spec("some/bias", (64,), mesh) == P(None)
    with pytest.raises(ValueError, match="logical axes"):
        shd.param_spec("x/q_proj/kernel", (64,), mesh)


def test_load_llama_reads_sharded_slices(fixtures_dir):
    from mora_jax.hf import load_llama, read_config

    path = fixtures_dir / "e2e_public" / "base"
    mesh = mesh_lib.make_mesh(MESHES["fsdp4_tensor2"])
    shard_fn = shd.param_sharding_fn(abstract_params(read_config(path)), mesh)
    _, params = load_llama(path, shardings=shard_fn)
    _, plain = load_llama(path)
    q = params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == P("fsdp", "tensor") and q.addressable_shards[0].data.shape == (64 // 4, 64 // 2)
    assert params["model"]["norm"]["weight"].sharding.spec == P(None)
    _assert_trees_close(params, plain, rtol=0, atol=0)
    with pytest.raises(KeyError, match="no parameter"):
        shard_fn(("model", "layers_9", "mlp", "up_proj", "kernel"))


def test_mesh_config_errors():
    assert mesh_lib.MeshConfig().resolve(8) == (8, 1, 1)
    assert mesh_lib.MeshConfig(axis_sizes=(2, -1, 2)).resolve(8) == (2, 2, 2)
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(axis_sizes=(2, -1, 2)))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="need a multiple of 3 devices"):
        mesh_lib.make_mesh(mesh_lib.MeshConfig(axis_sizes=(-1, 3, 1)))
    with pytest.raises(ValueError, match="has 12 devices but there are 8"):
        mesh_lib.make_mesh(mesh_lib.MeshConfig(axis_sizes=(3, 2, 2)))
    with pytest.raises(ValueError, match="at most one mesh axis may have size -1"):
        mesh_lib.MeshConfig(axis_sizes=(-1, -1, 2))
    with pytest.raises(ValueError, match="3 axis names .* but 2 sizes"):
        mesh_lib.MeshConfig(axis_sizes=(4, 2))
    with pytest.raises(ValueError, match="distinct"):
        mesh_lib.MeshConfig(("data", "data"), (2, 4))
    with pytest.raises(ValueError, match="has size 0"):
        mesh_lib.MeshConfig(axis_sizes=(8, 0, 1))
    with pytest.raises(ValueError, match="holds 8 of the 8 batch shards"):
        shd.shard_batch({"input_ids": np.zeros((4, 16), np.int32)}, mesh_lib.make_mesh(mesh_lib.MeshConfig()))
