"""diffucode: a local code companion for diffusion language models.

The distribution's subpackages are the repository's top-level folders: `diffucode.daemon`
(model, sampler, tasks, CLI back end), `diffucode.lsp` (language server) and
`diffucode.quantization`. Importing this package imports nothing heavy.
"""

__version__ = "0.1.0"
