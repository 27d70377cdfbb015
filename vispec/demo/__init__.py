"""The offline demo: a small VLM built on SmolLM2-135M-Instruct that describes procedurally generated scenes."""
