"""Brain-Score: export a trained model as a brainscore_vision plugin (``export``), activations and
scores here (``local``), scoring beside training (``follow``). Imports models and runs, nothing above."""
