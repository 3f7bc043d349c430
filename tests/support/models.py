"""Model configs the tests plan or train with."""

from __future__ import annotations

from typing import Any

# A llama config of about 400B parameters: no plan fits it on any machine these tests run on. The
# estimator reads only the config, so an empty weights file is all its folder needs.
HUGE_LLAMA: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16384,
    "intermediate_size": 53248, "num_hidden_layers": 126, "num_attention_heads": 128,
    "num_key_value_heads": 8, "vocab_size": 512, "max_position_embeddings": 512,
    "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": "bfloat16",
}
