"""What every layer uses: atomic files, model and tokenizer loading, output-dir checks, process groups, and the
errors a run stops with. Imports nothing else of liftft."""
