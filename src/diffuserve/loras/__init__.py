"""LoRA adapters without torch: their files' layout, and where the names requests give lead."""
