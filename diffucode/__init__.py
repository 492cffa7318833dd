"""diffucode: a local code companion for diffusion language models.

    from diffucode import Engine
    engine = Engine.load()  # the bundled model, or Engine.load("apple/DiffuCoder-7B-cpGRPO")
    print(engine.infill("def add(a, b):\n    return ", "\n").text)

The distribution's subpackages are the repository's top-level folders: `diffucode.daemon`
(engine: the model; rpc: the wire; serve: the daemon), `diffucode.lsp` (language server) and
`diffucode.quantization`. Importing this package imports nothing heavy: `Engine` (and torch with
it) is imported on first use.
"""

__version__ = "0.1.0"
__all__ = ["Engine", "__version__"]


def __getattr__(name: str):
    if name == "Engine":
        from diffucode.daemon.engine.api import Engine

        return Engine
    raise AttributeError(f"module 'diffucode' has no attribute {name!r}")
