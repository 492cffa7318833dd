"""The diffucode language server (pygls). Importing it must not import torch."""
