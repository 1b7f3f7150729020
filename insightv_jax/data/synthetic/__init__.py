"""The procedural visual-reasoning suite (the embedded default dataset) and its oracle."""
