"""Prompt-learning specs (prompt tuning, prefix tuning) for the shared invariant matrix.

Only transformers models have token embeddings and attention caches: the MLP and the conv net are
skipped (``None``).  Two invariants do not apply, by design of the methods:
* "init": virtual tokens change the output from the first step (a soft prompt is extra input, a
  prefix adds keys to every softmax; even an all-zero prefix takes attention mass), and prompt
  tuning also lengthens the output by its P virtual positions, as in peft;
* "merge": neither is a weight change, so both refuse to merge (``mergeable=False``).
"""
NO_TOKENS = {"mlp": None, "conv": None}  # no token embeddings / attention cache to extend

SPECS = {
    "prompt": ("prompt", {"num_virtual_tokens": 3}, NO_TOKENS),
    "prompt_text": ("prompt", {"num_virtual_tokens": 4, "init_token_ids": [5, 6, 7]}, NO_TOKENS),
    "prefix": ("prefix", {"num_virtual_tokens": 3, "encoder_hidden_size": 16}, NO_TOKENS),
    # no MLP: the table starts from the keys/values of sampled real tokens (init="vocab")
    "prefix_flat": ("prefix", {"num_virtual_tokens": 2, "prefix_projection": False}, NO_TOKENS),
}
SKIP = {spec: {"init", "merge"} for spec in SPECS}
