"""Measuring a model: clean and robust top-1 on the validation splits (``evaluate``) and the FixRes
test-size sweep and fine-tuning (``fixres``). Imports everything below training (brainscore
for FixRes by a Brain-Score benchmark)."""
