"""Stand-ins for brainscore_vision benchmarks, for tests that cannot download a real one. Each runs
the ModelCommitment it is given on a local StimulusSet through the commitment's own activations
model (brainscore's extractor, its result cache included), so what it measures is what the
exported plugin computes, and scores something the test can predict."""

from pathlib import Path

import numpy as np
import pandas as pd
from brainscore_core.metrics import Score
from brainscore_core.supported_data_standards.brainio.stimuli import StimulusSet
from PIL import Image


def stimulus_set(folder: Path, identifier: str, n: int = 3) -> StimulusSet:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(n)]
    for i in ids:
        Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    stimuli = StimulusSet(pd.DataFrame({"stimulus_id": ids}))
    stimuli.stimulus_paths = {i: folder / f"{i}.png" for i in ids}
    stimuli.identifier = identifier
    return stimuli


class CropBenchmark:
    """Scores a peak at ``best_crop``: the crop is read from the size of the stem's activations
    (stride 2), i.e. from what the plugin actually fed the network."""

    def __init__(self, stimuli: StimulusSet, best_crop: int):
        self.stimuli, self.best_crop, self.crops = stimuli, best_crop, []

    def __call__(self, model) -> Score:
        net = model.activations_model._model
        acts = model.activations_model(self.stimuli, layers=["conv_stem"])
        side = int(round((acts.shape[1] / net.conv_stem.out_channels) ** 0.5))
        crop = 2 * side
        self.crops.append(crop)
        return Score(1.0 - abs(crop - self.best_crop) / 100)


class ReadoutBenchmark:
    """The mean read-out activation: it changes with the weights."""

    def __init__(self, stimuli: StimulusSet, layer: str = "global_pool"):
        self.stimuli, self.layer = stimuli, layer

    def __call__(self, model) -> Score:
        return Score(float(np.asarray(model.activations_model(self.stimuli, layers=[self.layer])).mean()))
