"""Data: the phantom generator, shard writing and the WebDataset stream."""
