class LlamaConfig: pass
