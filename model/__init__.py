from fusedlis.model.config import LlamaConfig
