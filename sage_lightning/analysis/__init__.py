"""The paper's analyses of what a SAGE run found, one per file, each writing ``RUN/analysis/<name>.json``:
prompt-independence of failure latents (finding 2), distorted vs unrelated failures (finding 3), failure-region
size and probability, failure types. Command: ``sage analyze RUN_DIR --what ...`` (:mod:`.cli`)."""
