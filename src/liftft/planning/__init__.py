"""Before and beside training: `liftft estimate`'s memory plan and `liftft bench`'s measured throughput and peak."""
