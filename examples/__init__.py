"""Examples trained with adamw_flax (run from the repository root)."""
