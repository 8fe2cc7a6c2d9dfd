"""Flax NNX models (the Llama family) that run float or packed GPTQ weights."""
