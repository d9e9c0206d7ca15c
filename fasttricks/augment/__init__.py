"""GPU augmentation inside the batch: heavy augmentation (`heavy`) and CutMix /
Foreground-CutMix (`mixing`)."""
