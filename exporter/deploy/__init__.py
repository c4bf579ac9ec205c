"""What ships with the GGUFs: Ollama Modelfiles per Ollama version, the chat template translated to Go
(and the evaluator that verifies it), llama-server launch configs."""
