"""mimfm stage one: MiM hierarchical masked pretraining."""
