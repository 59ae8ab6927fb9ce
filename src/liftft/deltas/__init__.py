"""What a run produces: save, load, check, apply, remove and merge a delta, export it as a SHiRA adapter,
publish it to the hub with its model card."""
