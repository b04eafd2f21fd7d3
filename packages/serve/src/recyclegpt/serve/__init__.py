"""recyclegpt.serve: an OpenAI-compatible LitServe server for RecycleGPT (``recyclegpt-serve``)."""
