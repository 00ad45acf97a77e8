"""Our plain-LoRA adapter files load in Hugging Face PEFT and give the same logits (torch extra)."""

import jax
import numpy as np
import pytest

import mora_jax as mj
from mora_jax import hf

pytestmark = pytest.mark.torch


def test_lora_adapter_saved_here_runs_in_hf_peft(fixtures_dir, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base_dir = fixtures_dir / "e2e_public" / "base"
    model, params = hf.load_llama(base_dir)
    config = mj.LoRAConfig(r=4, alpha=8.0)
    adapters = mj.init_adapters(params, config, jax.random.key(0))
    leaves, tree = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    adapters = jax.tree_util.tree_unflatten(tree, [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    hf.save_adapter(tmp_path / "adapter", config, adapters, base_model_name_or_path=str(base_dir))

    ids = np.load(fixtures_dir / "e2e_public" / "expected.npz")["input_ids"]
    ours = np.asarray(mj.apply_model(model, params, ids, adapters=adapters))
    torch_model = transformers.LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(torch_model, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-4)
    assert np.abs(ours - np.asarray(model.apply({"params": params}, ids))).max() > 1e-3  # the adapter matters
