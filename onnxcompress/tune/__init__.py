"""onnxcompress tune: search pipelines to a budget (being built; see issue 17)."""
