"""The model side of diffucode: checkpoint loading, the Dream network, the sampler and tasks."""
