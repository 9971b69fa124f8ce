"""EMR risk reference model: a small Transformer over point-in-time timelines, three sigmoid heads (t2d, ckd, hf)."""
