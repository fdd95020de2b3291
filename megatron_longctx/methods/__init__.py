"""Context-extension methods beyond a RoPE setting: LongRoPE's factor search (and, next,
LongRecipe/PoSE)."""
