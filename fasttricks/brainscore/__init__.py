"""Brain-Score: export a trained model as a brainscore_vision plugin (``export``), and use that
export here: activations on local images and benchmark scores (``local``)."""
