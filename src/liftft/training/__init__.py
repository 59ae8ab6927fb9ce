"""One fine-tuning run: `liftft train`'s settings, loop, checkpoints, run directory, config file, reporting and
FSDP2, and the callback that runs `LiftAdamW` inside transformers' Trainer."""
