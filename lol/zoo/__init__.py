"""The LoRA zoo: build labelled LoRA collections (faces, fashion, lm) on base models trained here."""
