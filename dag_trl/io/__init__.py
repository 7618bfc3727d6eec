"""Input and output: model cards and Hub pushes, trackers, and the report's figures."""
