"""Structured pruning that physically shrinks the model: importance metrics (FLAP, Wanda-sp,
magnitude), pure state-dict/spec shrinking (heads, KV groups, MLP channels, blocks) and the
`prune_structured` / `prune_layers` passes."""
