"""Starting workers: Ray Train on an embedded or existing Ray cluster, or local processes without Ray."""
