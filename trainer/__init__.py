"""One hilum worker: data stream, models, objectives, the DeepSpeed engine and the step loop."""
