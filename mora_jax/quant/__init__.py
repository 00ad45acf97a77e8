"""QMoRA: adapters on a quantized frozen base (weight-only; see ``docs/quantization.md``).

* :mod:`mora_jax.quant.config`: :class:`~mora_jax.quant.config.QuantConfig` (``model.quantize``);
* :mod:`mora_jax.quant.formats`: the quantized leaf and the formats (int8, int4, nf4, GGUF q8_0 / q4_0 / q4_1);
* :mod:`mora_jax.quant.transform`: ``quantize(params, config)`` and the tree helpers;
* :mod:`mora_jax.quant.matmul`: a Dense layer's output on a quantized kernel, inside the jitted step.
"""
