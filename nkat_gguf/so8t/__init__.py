"""SO8T: SO(8) block rotations baked into the weights (plan and bake, convert's bake step, QC)."""
