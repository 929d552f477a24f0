"""What `mask2former predict` writes: image ids, the journal of an output folder, the folder run."""
