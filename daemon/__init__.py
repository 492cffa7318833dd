"""The model daemon, in three rooms: `engine` (the model: weights, network, samplers, tasks),
`rpc` (the wire protocol, the client, the address; no torch) and `serve` (socket server,
scheduler, reload). `errors` is shared by all three."""
