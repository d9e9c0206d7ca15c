"""Data: the toy set (`toy`), ImageFolder → .beton compilation (`beton`), FFCV loaders (`loader`)."""
