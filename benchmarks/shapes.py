"""Model shapes the benchmarks build with random weights (transformers config keyword arguments)."""

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
# Baichuan2-7B as model_baichuan/convert.py writes it (a Llama): Llama-2-7B's blocks, a 125,696-token vocabulary
BAICHUAN2_7B = LLAMA2_7B | dict(vocab_size=125696)
# GLM-4-9B (GlmForCausalLM, the -hf checkpoints): 2 key/value heads, half rotary, fused gate_up, 151,552 tokens
GLM4_9B = dict(vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_hidden_layers=40,
               num_attention_heads=32, num_key_value_heads=2, head_dim=128, partial_rotary_factor=0.5,
               attention_bias=True, max_position_embeddings=8192, rms_norm_eps=1.5625e-07)
