"""The streaming engine shared by transfer, diff, apply, merge and LoRA extraction: `plan` (checking inputs against
each other and the typed report), `streaming` (row blocks -> jitted kernel -> write, in bounded memory) and
`outputs` (the atomic Hugging Face output directory with config and provenance)."""
